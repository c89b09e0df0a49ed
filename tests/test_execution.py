"""orchestrator.execution.protocol in process, on real PostgreSQL: when outputs become visible, what
a cancel charges for outputs not yet recorded, and which transactions skip the WAL wait."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.db import commit_without_flush_wait
from orchestrator.execution import protocol as execution
from orchestrator.jobs import service as jobs
from orchestrator.jobs import states
from orchestrator.storage import Storage
from orchestrator.tables import jobs as jobs_table
from tests.ledger_helpers import grant, new_account

SPEC = {"type": "txt2img", "prompt": "a lighthouse", "steps": 20, "num_images": 3}


def started(engine: Engine, storage: Storage) -> tuple[str, execution.RunContext]:
    account = new_account(engine)
    grant(engine, account, 10)
    job_id = jobs.submit(engine, storage, account, dict(SPEC)).job["id"]
    attempt = execution.begin(engine, job_id, "test-worker")
    assert attempt is not None
    return job_id, execution.RunContext(engine, storage, attempt)


def outputs(engine: Engine, job_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(jobs_table.c.outputs).where(jobs_table.c.id == job_id)).scalar_one()
        )


def test_outputs_are_recorded_with_the_next_progress_write(
    pg_engine: Engine, storage: Storage
) -> None:
    job_id, ctx = started(pg_engine, storage)
    ctx.deliver(0, b"png-0", {"seed": 1})
    ctx._last_check = 0.0  # (a check is due)
    ctx.progress(1, 3)  # within the write interval of begin: a lease check only
    assert outputs(pg_engine, job_id) == []
    ctx._last_write = 0.0  # the interval has passed
    ctx.progress(2, 3)
    assert [o["index"] for o in outputs(pg_engine, job_id)] == [0]
    assert ctx.unrecorded == []
    with pg_engine.connect() as conn:
        step, total = conn.execute(
            select(jobs_table.c.progress_step, jobs_table.c.progress_total).where(
                jobs_table.c.id == job_id
            )
        ).one()
    assert (step, total) == (2, 3)
    execution.finish(pg_engine, ctx.attempt, states.SUCCEEDED, ctx=ctx)  # leave nothing active


def test_cancel_charges_outputs_still_unrecorded(pg_engine: Engine, storage: Storage) -> None:
    job_id, ctx = started(pg_engine, storage)
    ctx.deliver(0, b"png-0", {"seed": 1})
    ctx.deliver(1, b"png-1", {"seed": 2})
    jobs.cancel(pg_engine, ctx.attempt.account_id, job_id)
    status = execution.finish(
        pg_engine, ctx.attempt, states.CANCELED, "canceled by the client", ctx=ctx
    )
    assert status == states.CANCELED
    job = jobs.get(pg_engine, ctx.attempt.account_id, job_id)
    assert (job["charged"], job["refunded"]) == (2, 1)
    assert [o["index"] for o in job["outputs"]] == [0, 1]


def expire_lease(engine: Engine, job_id: str) -> None:
    """As if the lease holder stopped renewing: its lease ran out a moment ago."""
    run_transaction(
        engine,
        lambda c: c.execute(
            update(jobs_table)
            .where(jobs_table.c.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        ),
    )


def test_a_superseded_attempt_records_nothing(pg_engine: Engine, storage: Storage) -> None:
    job_id, old = started(pg_engine, storage)
    old.deliver(0, b"png-0", {"seed": 1})
    # A duplicate delivery while the lease is live leaves the job alone...
    assert execution.begin(pg_engine, job_id, "another-worker") is None
    expire_lease(pg_engine, job_id)
    newer = execution.begin(pg_engine, job_id, "another-worker")  # ...once it expired: taken
    assert newer is not None
    assert execution.finish(pg_engine, old.attempt, states.SUCCEEDED, ctx=old) == states.RUNNING
    assert outputs(pg_engine, job_id) == []
    execution.finish(pg_engine, newer, states.FAILED, "test over")  # leave nothing active
    attempts = jobs.get(pg_engine, old.attempt.account_id, job_id)["attempts"]
    assert [(a["number"], a["worker"], a["outcome"]) for a in attempts] == [
        (1, "test-worker", "lease_expired"),
        (2, "another-worker", "failed"),
    ]


def test_commit_without_flush_wait_is_for_one_transaction_only(pg_engine: Engine) -> None:
    def setting(conn: Any) -> str:
        return str(conn.exec_driver_sql("SHOW synchronous_commit").scalar_one())

    def relaxed(conn: Any) -> str:
        commit_without_flush_wait(conn)
        return setting(conn)

    assert run_transaction(pg_engine, relaxed) == "off"
    assert run_transaction(pg_engine, setting) == "on"


def test_progress_reads_the_cancel_flag_at_most_once_per_check_interval(
    pg_engine: Engine, storage: Storage
) -> None:
    job_id, ctx = started(pg_engine, storage)
    jobs.cancel(pg_engine, ctx.attempt.account_id, job_id)
    ctx.progress(1, 3)  # begin checked a moment ago: no read, the run goes on
    ctx._last_check -= execution.PROGRESS_CHECK_INTERVAL_S  # the interval has passed
    with pytest.raises(execution.JobStopped, match="canceled"):
        ctx.progress(2, 3)
    execution.finish(pg_engine, ctx.attempt, states.CANCELED, "canceled", ctx=ctx)
