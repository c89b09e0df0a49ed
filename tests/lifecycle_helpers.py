"""Helpers for end-to-end job tests against a real Celery worker."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, select, update

from billing import ledger
from billing.db import run_transaction
from orchestrator.jobs import service as jobs
from orchestrator.jobs.states import TERMINAL
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.scheduling.scheduler import nudge
from orchestrator.storage import Storage
from orchestrator.tables import job_results
from orchestrator.tables import jobs as jobs_table

WAIT_TIMEOUT_S = 45


def submit(
    engine: Engine,
    storage: Storage,
    redis_url: str,
    account: str,
    spec: dict[str, Any],
    *,
    publish: bool = True,
) -> str:
    spec = dict(spec)
    behaviour = spec.pop("test", None)  # not a product field: the spec would be refused
    job_id = jobs.submit(engine, storage, account, spec).job["id"]
    if behaviour is not None:
        script(engine, job_id, str(behaviour))
    if publish:
        nudge(engine, Publisher(redis_url), job_id)
    return str(job_id)


def script(engine: Engine, job_id: str, behaviour: str) -> None:
    """Give a submitted, not yet published job a scripted behaviour (tests.support.behaviours
    reads the stored spec's `test`): written after the submit, which refuses unknown fields."""

    def work(conn: Any) -> None:
        stored = conn.execute(select(jobs_table.c.spec).where(jobs_table.c.id == job_id)).scalar()
        conn.execute(
            update(jobs_table)
            .where(jobs_table.c.id == job_id)
            .values(spec={**stored, "test": behaviour})
        )

    run_transaction(engine, work)


def row(engine: Engine, job_id: str) -> Any:
    return run_transaction(
        engine, lambda c: c.execute(select(jobs_table).where(jobs_table.c.id == job_id)).one()
    )


def wait_until(
    engine: Engine, job_id: str, predicate: Any, timeout_s: float = WAIT_TIMEOUT_S
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = row(engine, job_id)
        if predicate(current):
            return current
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} stuck at {row(engine, job_id).status}")


def wait_terminal(engine: Engine, job_id: str, timeout_s: float = WAIT_TIMEOUT_S) -> Any:
    return wait_until(engine, job_id, lambda r: r.status in TERMINAL, timeout_s)


def available(engine: Engine, account: str, kind: str = "image") -> int:
    return run_transaction(engine, lambda c: ledger.get_balance(c, account, kind)).available


def results(engine: Engine, job_id: str) -> list[Any]:
    return list(
        run_transaction(
            engine,
            lambda c: c.execute(
                select(job_results).where(job_results.c.job_id == job_id).order_by(job_results.c.id)
            ).all(),
        )
    )
