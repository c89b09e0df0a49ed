"""`scheduler.release` on PostgreSQL is one statement (a data-modifying CTE): it leaves the
flow exactly as the two-statement path does, for a dispatched entry, a queued one and an
absent one, and for a flow that the release makes eligible again."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event, select, update

from billing.clock import utcnow
from orchestrator.jobs import service as jobs
from orchestrator.scheduling import flows
from orchestrator.scheduling.scheduler import release, release_in_steps, taken
from orchestrator.storage import Storage
from orchestrator.tables import dispatch_queue, sched_flows
from tests.ledger_helpers import grant, new_account

SPEC = {"type": "txt2img", "prompt": "p", "steps": 20}


def _state(conn: Any, acc: str) -> tuple[Any, ...]:
    flow = conn.execute(select(sched_flows).where(sched_flows.c.account_id == acc)).one()
    entries = conn.execute(
        select(dispatch_queue.c.job_id, dispatch_queue.c.state)
        .where(dispatch_queue.c.account_id == acc)
        .order_by(dispatch_queue.c.job_id)
    ).all()
    return tuple(flow), tuple(map(tuple, entries))


def test_one_statement_release_matches_the_two_statement_path(
    pg_engine: Engine, storage: Storage
) -> None:
    acc = new_account(pg_engine, "standard")
    grant(pg_engine, acc, 100)
    running, waiting, third = (
        str(jobs.submit(pg_engine, storage, acc, SPEC).job["id"]) for _ in range(3)
    )
    statements: list[str] = []
    with pg_engine.connect() as conn, conn.begin():
        now = utcnow()
        taken(conn, running, now)  # holds a slot now
        # At its cap: the release makes the flow eligible again (it enters at max(V, F)).
        conn.execute(update(sched_flows).where(sched_flows.c.account_id == acc).values(cap=1))
        for job_id in (running, waiting, "job_absent"):
            reference = conn.begin_nested()
            release_in_steps(conn, job_id, now.timestamp())
            expected = _state(conn, acc)
            reference.rollback()

            def count(*args: Any, sink: list[str] = statements) -> None:
                sink.append(args[2])

            event.listen(conn, "before_cursor_execute", count)
            release(conn, job_id, now)
            event.remove(conn, "before_cursor_execute", count)
            assert len(statements) == 1 and statements.pop().startswith("WITH gone AS")
            assert _state(conn, acc) == expected, job_id
            if job_id == running:  # it entered the line again as of now
                assert expected[0][sched_flows.c.keys().index("head_since_s")] == now.timestamp()
        flow = conn.execute(select(sched_flows).where(sched_flows.c.account_id == acc)).one()
        assert (flow.running, flow.queued) == (0, 1)  # the third job still waits
        assert _state(conn, acc)[1] == ((third, "queued"),)
        conn.rollback()
    assert len(flows.RELEASED_SQL) < 4096  # psycopg caches its parsing of queries this short
