"""Every dispatch pass runs the queue lock and state reads; PostgreSQL must not plan them
again at each pass. psycopg prepares a statement at its 5th run on a connection; the plan
cache then tries custom plans 5 times and settles on the generic one when it costs no more.
With `queue = ANY($1)` it kept choosing custom plans (a full planning per pass)."""

from __future__ import annotations

from sqlalchemy import Engine, text

from orchestrator.scheduling.decision import PG_LOCK_QUEUES_SQL, lock_queues

RUNS = 16  # 5 unprepared + 5 custom tries + generic ones


def test_the_queue_lock_and_state_reads_settle_on_generic_plans(pg_engine: Engine) -> None:
    queues = ("gpu.post", "gpu.txt2img")
    with pg_engine.connect() as conn:
        for _ in range(RUNS):
            with conn.begin():
                rows = lock_queues(conn, queues)
            assert [r.queue for r in rows] == sorted(queues)
        plans = conn.execute(
            text(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement LIKE '%unnest(%sched_queues%'"
            )
        ).all()
    lock_sql = PG_LOCK_QUEUES_SQL.split(" FROM ")[0]
    assert len(plans) == 2, plans  # the lock and the state read, both prepared
    assert any(p.statement.startswith(lock_sql) for p in plans)
    for p in plans:
        assert p.generic_plans >= RUNS - 10 and p.custom_plans <= 5, p
