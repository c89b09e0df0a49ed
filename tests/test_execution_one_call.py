"""The PL/pgSQL begin and finish (migration 0011) against the Python path they stand in for,
on real PostgreSQL: the same job row, attempt, result, ledger and outbox event for a full,
a partial and an empty delivery; one statement each; a rerun of finish charges nothing."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator import db_direct
from orchestrator.execution import protocol as execution
from orchestrator.execution import result, start
from orchestrator.jobs import service as jobs
from orchestrator.jobs import states
from orchestrator.scheduling import scheduler
from orchestrator.storage import Storage
from tests.ledger_helpers import grant, new_account

SPEC = {"type": "txt2img", "prompt": "a lighthouse", "steps": 20, "num_images": 3}
JOB_FIELDS = (
    "status, charged, refunded, error, outputs::text, progress_step, progress_total, attempt,"
    " worker, finished_at IS NOT NULL, started_at IS NOT NULL"
)


def dispatched_job(engine: Engine, storage: Storage) -> tuple[str, str]:
    account = new_account(engine)
    grant(engine, account, 10)
    job_id = jobs.submit(engine, storage, account, dict(SPEC)).job["id"]

    def dispatch(c: Any) -> None:
        c.execute(text("UPDATE jobs SET status = 'dispatched' WHERE id = :id"), {"id": job_id})
        scheduler.taken(c, job_id, utcnow())  # its entry and flow hold a slot

    run_transaction(engine, dispatch)
    return account, job_id


def record(engine: Engine, job_id: str) -> dict[str, Any]:
    """What begin and finish left, without ids, keys, tokens and times."""
    with engine.connect() as conn:
        row = conn.execute(text(f"SELECT {JOB_FIELDS} FROM jobs WHERE id = :id"), {"id": job_id})
        job = list(row.one())
        job[4] = job[4].replace(job_id, "JOB")
        events = [
            {k: v for k, v in p.items() if k not in ("at", "job_id", "account_id")}
            for (p,) in conn.execute(
                text(
                    "SELECT payload FROM outbox WHERE job_id = :id AND topic = 'event' ORDER BY id"
                ),
                {"id": job_id},
            )
        ]
        attempts = conn.execute(
            text(
                "SELECT phase, number, worker, outcome, detail, ended_at IS NOT NULL"
                " FROM job_attempts WHERE job_id = :id"
            ),
            {"id": job_id},
        ).all()
        results = conn.execute(
            text(
                "SELECT phase, attempt, outcome, delivered, applied, detail FROM job_results"
                " WHERE job_id = :id"
            ),
            {"id": job_id},
        ).all()
        flow = conn.execute(
            text(
                "SELECT f.queued, f.running, f.eligible, f.head_tag, f.sort_key > 0,"
                " (SELECT count(*) FROM dispatch_queue d WHERE d.job_id = :id)"
                " FROM sched_flows f JOIN jobs j ON j.account_id = f.account_id WHERE j.id = :id"
            ),
            {"id": job_id},
        ).one()
        hold = conn.execute(
            text("SELECT status, committed FROM holds WHERE reference = :id"), {"id": job_id}
        ).one()
        account = conn.execute(
            text(
                "SELECT b.balance, b.held FROM balances b JOIN jobs j"
                " ON j.account_id = b.account_id AND b.kind = j.credit_kind WHERE j.id = :id"
            ),
            {"id": job_id},
        ).one()
    return {
        "job": job,
        "events": events,
        "attempts": [tuple(a) for a in attempts],
        "results": [tuple(r) for r in results],
        "flow": tuple(flow),
        "hold": tuple(hold),
        "balance": tuple(account),
    }


def run(engine: Engine, storage: Storage, job_id: str, delivered: int, one_call: bool) -> str:
    if one_call:
        attempt = execution.begin(engine, job_id, "w@host")
    else:
        attempt = run_transaction(
            engine, lambda c: start._begin(c, job_id, "tok" * 8, "w@host", execution.JOB_PHASE)
        )
    assert attempt is not None and attempt.price is not None
    ctx = execution.RunContext(engine, storage, attempt)
    for index in range(delivered):
        ctx.deliver(index, b"png", {"seed": index})
    ctx.not_delivered(2, "withheld by the safety checker")
    ctx.step, ctx.total = 20, 20
    if one_call:
        return execution.finish(engine, attempt, states.SUCCEEDED, ctx=ctx)
    return run_transaction(
        engine,
        lambda c: result._finish(c, attempt, states.SUCCEEDED, None, execution.JOB_PHASE, ctx),
    )


@pytest.mark.parametrize("delivered", [2, 1, 0])
def test_one_call_matches_the_python_path(
    pg_engine: Engine, storage: Storage, delivered: int
) -> None:
    statements: list[str] = []
    seen: list[str] = []
    for one_call in (True, False):
        _, job_id = dispatched_job(pg_engine, storage)

        def count(_c: Any, _cur: Any, sql: str, *_: Any) -> None:
            statements.append(sql)

        event.listen(pg_engine, "before_cursor_execute", count)
        db_direct.listen(statements.append)  # begin's and finish's own connection
        try:
            status = run(pg_engine, storage, job_id, delivered, one_call)
        finally:
            event.remove(pg_engine, "before_cursor_execute", count)
            db_direct.unlisten(statements.append)
        seen.append(repr(record(pg_engine, job_id)))
        assert status == (states.SUCCEEDED if delivered else states.FAILED)
        if one_call:  # begin and finish (with the slot's release): one statement each
            calls = [s for s in statements if "tollgate_job_" in s]
            assert len(calls) == 2 and len(statements) <= 5, statements
            assert not any(s.startswith("WITH gone") for s in statements), statements
    assert seen[0] == seen[1]


def test_a_finish_rerun_charges_nothing_more(pg_engine: Engine, storage: Storage) -> None:
    _, job_id = dispatched_job(pg_engine, storage)
    attempt = execution.begin(pg_engine, job_id, "w@host")
    assert attempt is not None
    ctx = execution.RunContext(pg_engine, storage, attempt)
    ctx.deliver(0, b"png", {"seed": 0})
    assert execution.finish(pg_engine, attempt, states.SUCCEEDED, ctx=ctx) == states.SUCCEEDED
    before = record(pg_engine, job_id)
    # As after a commit whose answer was lost: the same result again.
    assert execution.finish(pg_engine, attempt, states.SUCCEEDED, ctx=ctx) == states.SUCCEEDED
    after = record(pg_engine, job_id)
    assert after == before
    assert after["hold"] == ("committed", 1) and len(after["results"]) == 1


def test_begin_leaves_a_canceled_job_to_the_python_path(
    pg_engine: Engine, storage: Storage
) -> None:
    account, job_id = dispatched_job(pg_engine, storage)
    run_transaction(
        pg_engine,
        lambda c: c.execute(
            text("UPDATE jobs SET cancel_requested = true WHERE id = :id"), {"id": job_id}
        ),
    )
    assert execution.begin(pg_engine, job_id, "w@host") is None
    job = jobs.get(pg_engine, account, job_id)
    assert (job["status"], job["charged"], job["refunded"]) == (states.CANCELED, 0, 3)
    with pg_engine.connect() as conn:
        assert (
            conn.execute(
                select(text("count(*)"))
                .select_from(text("job_attempts"))
                .where(text("job_id = :id")),
                {"id": job_id},
            ).scalar()
            == 0
        )
