"""The lease sweep (beat, every `lease_sweep_interval_s`): jobs whose lease expired (their
worker is gone: killed, preempted, partitioned) are taken back, each in one transaction under
its row lock:

- cancel requested: canceled, charging only the outputs already recorded;
- fewer than ATTEMPTS_MAX attempts: dispatched again as a new attempt on the same hold
  (`requeue`); nothing is charged twice, since only the current attempt's `finish` settles;
- otherwise: failed and refunded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection, Engine, select
from sqlalchemy.engine import Row

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.execution.leases import (
    ATTEMPTS_MAX,
    LEASE_EXPIRED,
    LEASED,
    end_attempt,
    is_expired,
)
from orchestrator.jobs import states
from orchestrator.jobs.records import transition
from orchestrator.scheduling import scheduler
from orchestrator.settlement.settle import settler_for
from orchestrator.tables import jobs

log = logging.getLogger(__name__)

LEASE_SWEEP_BATCH_MAX: Final = 100
# A tune's render phase runs this family's task (orchestrator.tunes.service.RENDER_TASK; the
# jobs and settlement stages import no family).
RENDER_TYPE: Final = "tune_render"


def requeue(conn: Connection, row: Row[Any], now: datetime) -> Row[Any]:
    """Dispatch a locked job again as a new attempt on the same hold(s): the lease is
    dropped, and the phase waits in the scheduler's line again. A plain job or a tune in
    training goes back to `queued` (then `dispatched`); a render stays `rendering` without a
    lease until its task takes it. The one place that decides how a job is run again."""
    cleared: dict[str, Any] = {
        "lease_token": None,
        "lease_expires_at": None,
        "worker_pid": None,
        "outputs": [],
        "progress_step": 0,
    }
    if row.status == states.RENDERING:
        new_status, task_type = states.RENDERING, RENDER_TYPE
    else:
        new_status, task_type = states.QUEUED, row.type
    moved = transition(conn, row.id, new_status, now, current=row.status, **cleared)
    # Back in line at its old place (the scheduler's entry returns to `queued`); the
    # dispatcher sends it when its queue has a free slot.
    scheduler.enqueue(conn, row.id, task_type, row.account_id, now)
    return moved


@dataclass(frozen=True)
class Recovery:
    job_id: str
    # The job family whose task ran (and is dispatched again): txt2img, ..., tune,
    # tune_render.
    family: str
    # canceled | redispatched | failed
    action: str


def family_of(row: Row[Any]) -> str:
    return RENDER_TYPE if row.status == states.RENDERING else str(row.type)


def recover(
    conn: Connection, row: Row[Any], now: datetime, outcome: str = LEASE_EXPIRED
) -> Recovery:
    """Take back a locked job whose attempt is gone: cancel, dispatch again or fail."""
    family = family_of(row)
    end_attempt(
        conn, row.id, row.status, row.attempt, outcome, now, "the worker stopped renewing its lease"
    )
    settle = settler_for(row)
    if row.cancel_requested:
        delivered = sum(1 for o in row.outputs if o.get("delivered"))
        settle(conn, row, states.CANCELED, delivered, now, "canceled by the client")
        return Recovery(row.id, family, "canceled")
    if row.attempt < ATTEMPTS_MAX:
        requeue(conn, row, now)
        return Recovery(row.id, family, "redispatched")
    settle(
        conn,
        row,
        states.FAILED,
        0,
        now,
        f"gave up after {row.attempt} attempts (the worker was lost each time)",
    )
    return Recovery(row.id, family, "failed")


def sweep(
    engine: Engine, now: datetime | None = None, limit: int = LEASE_SWEEP_BATCH_MAX
) -> list[Recovery]:
    """Recover up to `limit` jobs whose lease expired, oldest expiry first, one transaction
    each (rechecked under the row lock: a heartbeat may have renewed it meanwhile)."""
    now = now or utcnow()
    due = run_transaction(
        engine,
        lambda c: list(
            c.execute(
                select(jobs.c.id)
                .where(
                    jobs.c.status.in_(sorted(LEASED)),
                    jobs.c.lease_expires_at <= now,
                    jobs.c.lease_token.is_not(None),
                )
                .order_by(jobs.c.lease_expires_at)
                .limit(limit)
            ).scalars()
        ),
    )
    recovered = []
    for job_id in due:

        def work(conn: Connection, job_id: str = job_id) -> Recovery | None:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id).with_for_update()).one()
            return recover(conn, row, now) if is_expired(row, now) else None

        result = run_transaction(engine, work)
        if result is not None:
            log.warning("lease of job %s expired: %s", job_id, result.action)
            recovered.append(result)
    return recovered
