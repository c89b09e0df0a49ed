"""`scheduler.release` on PostgreSQL is one statement (a data-modifying CTE): it leaves the
flow exactly as the two-statement path does, for a dispatched entry, a queued one and an
absent one, and for a flow that the release makes eligible again. The dispatch decision's
writes (one fixed statement) match the step-by-step path too."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event, select, update

from billing.clock import utcnow
from orchestrator.jobs import service as jobs
from orchestrator.scheduling import dispatch_writes, flows
from orchestrator.scheduling.decision import apply_plan, lock_queues, plan_queue
from orchestrator.scheduling.scheduler import release, release_in_steps, taken
from orchestrator.storage import Storage
from orchestrator.tables import dispatch_queue, outbox, sched_flows, sched_queues
from orchestrator.tables import jobs as jobs_table
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


def test_the_fixed_dispatch_write_matches_the_step_by_step_path(
    pg_engine: Engine, storage: Storage
) -> None:
    """The decision's writes as one driver-SQL statement over arrays (PostgreSQL) leave
    flows, virtual time, entries, jobs and outbox rows exactly as the SQLite path does."""
    accs = [new_account(pg_engine, plan) for plan in ("standard", "free")]
    ids = []
    for acc in accs:
        grant(pg_engine, acc, 100)
        ids += [str(jobs.submit(pg_engine, storage, acc, SPEC).job["id"]) for _ in range(3)]
    queue = "gpu.txt2img"

    def snapshot(conn: Any) -> tuple[Any, ...]:
        mine = sched_flows.c.queue == queue
        ids = [t.job_id for t in taken_rows]
        return (
            [
                tuple(r)
                for r in conn.execute(select(sched_flows).where(mine).order_by(*sched_flows.c))
            ],
            conn.execute(select(sched_queues.c.vtime).where(sched_queues.c.queue == queue)).all(),
            [
                tuple(r)
                for r in conn.execute(
                    select(dispatch_queue)
                    .where(dispatch_queue.c.job_id.in_(ids))
                    .order_by(dispatch_queue.c.id)
                )
            ],
            conn.execute(
                select(jobs_table.c.id, jobs_table.c.status, jobs_table.c.updated_at)
                .where(jobs_table.c.id.in_(ids))
                .order_by(jobs_table.c.id)
            ).all(),
            conn.execute(
                select(
                    outbox.c.job_id, outbox.c.payload, outbox.c.created_at, outbox.c.published_at
                )
                .where(outbox.c.topic == "dispatch", outbox.c.job_id.in_(ids))
                .order_by(outbox.c.id)
            ).all(),
        )

    with pg_engine.connect() as conn, conn.begin():
        locked = lock_queues(conn, (queue,))
        now = utcnow()
        plan = plan_queue(conn, queue, float(locked[0].vtime), 4, now.timestamp())
        taken_rows, writes = apply_plan(conn, plan, 4, now.timestamp())
        vtimes = [{"b_queue": queue, "b_vtime": plan.vtime}]
        assert len(taken_rows) == 4 and len(writes) >= 2  # (and any earlier test's flow)
        for published in (False, True):
            reference = conn.begin_nested()
            dispatch_writes.write_in_steps(
                conn, now, taken_rows, writes, vtimes, published=published
            )
            expected = snapshot(conn)
            reference.rollback()
            fixed = conn.begin_nested()
            conn.exec_driver_sql(
                dispatch_writes.WRITE_RELAXED_SQL if published else dispatch_writes.WRITE_SQL,
                dispatch_writes.write_params(now, taken_rows, writes, vtimes, published=published),
            )
            assert snapshot(conn) == expected
            fixed.rollback()
        conn.rollback()
    assert len(dispatch_writes.WRITE_RELAXED_SQL) < 4096  # within psycopg's parse cache
