"""`begin`: a delivery takes its job (a new attempt and a lease), or finds nothing to run.

On PostgreSQL the usual case (a dispatched plain job with no webhook and no input image) is
one call of the PL/pgSQL function `tollgate_job_begin` (migration 0011): it locks the job,
takes it, records the attempt and the `running` event, exactly as the Python path below
does, and returns nothing when the job needs that path (a takeover, a cancel, too many
attempts, a webhook to queue, an input image, a rerun). The call is a transaction of its
own (autocommit on the thread's direct connection, orchestrator.db_direct: one round trip,
not BEGIN, the call and COMMIT); the Python path then runs in a new transaction, under its
own lock.
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Connection, Engine, select

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.db import commit_without_flush_wait
from orchestrator.db_direct import run_statement
from orchestrator.errors import OrchestratorError
from orchestrator.execution import leases
from orchestrator.execution.attempt import (
    BEGIN_RETRY_BUDGET_S,
    JOB_PHASE,
    STEP_ATTEMPTS_MAX,
    Attempt,
    Phase,
    Price,
)
from orchestrator.execution.leases import ATTEMPTS_MAX
from orchestrator.jobs import states, webhooks
from orchestrator.jobs.records import transition, webhook_event
from orchestrator.tables import jobs

log = logging.getLogger(__name__)

WORKER_MAX_LEN: Final = 200
# Plain driver SQL (pyformat, as psycopg takes it); timestamps are naive UTC, as stored.
_PG_BEGIN_SQL: Final = (
    "SELECT r_attempt, r_spec, r_account_id, r_created_at, r_first_start, r_price,"
    " r_price_per_output, r_outputs_expected FROM tollgate_job_begin(%(job)s::text,"
    " %(token)s::text, %(worker)s::text, %(pid)s::integer, %(now)s::timestamp,"
    " %(lease)s::timestamp, %(at)s::text, %(attempts_max)s::integer)"
)


def begin(engine: Engine, job_id: str, worker: str, phase: Phase = JOB_PHASE) -> Attempt | None:
    """Take the job for this delivery, or return None when there is nothing to run."""
    token = secrets.token_hex(16)  # chosen once, so a rerun can recognise its own take
    if phase is JOB_PHASE and engine.dialect.name == "postgresql":
        # The function call is a transaction of its own (one round trip). When it takes
        # nothing (the job needs the Python path, or this is a rerun after a lost answer:
        # the job is then running under this token), the Python path runs in a new
        # transaction under its own lock.
        taken = _begin_pg(engine, job_id, token, worker)
        if taken is not None:
            return taken
    return run_transaction(
        engine,
        lambda conn: _begin(conn, job_id, token, worker, phase),
        attempts_max=STEP_ATTEMPTS_MAX,
        budget_s=BEGIN_RETRY_BUDGET_S,
    )


def _naive(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None)


def _begin_pg(engine: Engine, job_id: str, token: str, worker: str) -> Attempt | None:
    """The one-call take (a transaction of its own, on the thread's direct connection)."""
    now = utcnow()

    def params() -> dict[str, Any]:
        nonlocal now
        now = utcnow()  # each attempt's own clock: a retried take gets a full lease
        return {
            "job": job_id,
            "token": token,
            "worker": worker[:WORKER_MAX_LEN],
            "pid": os.getpid(),
            "now": _naive(now),
            "lease": _naive(leases.lease_expiry(now)),
            "at": now.isoformat(),
            "attempts_max": ATTEMPTS_MAX,
        }

    row = run_statement(
        engine,
        _PG_BEGIN_SQL,
        params,
        attempts_max=STEP_ATTEMPTS_MAX,
        budget_s=BEGIN_RETRY_BUDGET_S,
    )
    if row is None:
        return None  # the Python path decides (in a transaction of its own)
    created_at = row.r_created_at.replace(tzinfo=UTC)
    spec = row.r_spec if isinstance(row.r_spec, dict) else {}
    return Attempt(
        job_id,
        int(row.r_attempt),
        token,
        dict(spec),
        row.r_account_id,
        None,
        start_webhook=False,
        created_at=created_at,
        queue_wait_s=seconds_between(created_at, now) if row.r_first_start else None,
        price=Price(int(row.r_price), int(row.r_price_per_output), int(row.r_outputs_expected)),
    )


def _begin(conn: Connection, job_id: str, token: str, worker: str, phase: Phase) -> Attempt | None:
    row = conn.execute(select(jobs).where(jobs.c.id == job_id).with_for_update()).first()
    if row is None:
        log.warning("task for unknown job %s ignored", job_id)
        return None
    if row.lease_token == token and row.status == phase.running_status:
        # A rerun after a commit whose answer was lost: this delivery already took it.
        input_key = _input_key(conn, row.account_id, row.spec)
        return Attempt(job_id, row.attempt, token, dict(row.spec), row.account_id, input_key)
    if row.status not in phase.startable:
        return None  # ended, or in another phase: a stale or duplicate delivery
    now = utcnow()
    taking_over = row.status == phase.running_status and row.lease_token is not None
    if taking_over and leases.is_live(row, now):
        if not leases.holder_gone(row, worker):
            return None  # another attempt holds a live lease: a duplicate delivery
        outcome = leases.WORKER_LOST
    else:
        outcome = leases.LEASE_EXPIRED
    if taking_over:
        leases.end_attempt(
            conn, job_id, row.status, row.attempt, outcome, now, f"taken over by {worker}"
        )
    if row.cancel_requested:
        delivered = sum(1 for o in row.outputs if o.get("delivered"))
        phase.settle(conn, row, states.CANCELED, delivered, now, "canceled by the client")
        return None
    if row.attempt >= ATTEMPTS_MAX:
        phase.settle(
            conn,
            row,
            states.FAILED,
            0,
            now,
            f"gave up after {row.attempt} attempts (worker lost each time)",
        )
        return None
    input_key = _input_key(conn, row.account_id, row.spec)
    started = transition(
        conn,
        job_id,
        phase.running_status,
        now,
        current=row.status,
        attempt=row.attempt + 1,
        lease_token=token,
        worker=worker[:WORKER_MAX_LEN],
        worker_pid=os.getpid(),
        lease_expires_at=leases.lease_expiry(now),
        # When the job first began (a tune's training), not this attempt or phase.
        started_at=row.started_at or now,
        outputs=[],
        progress_step=0,
    )
    leases.start_attempt(conn, row, phase.running_status, row.attempt + 1, worker, now)
    # Only a lease is at stake: if a crash loses it, the job is redelivered or reaped.
    commit_without_flush_wait(conn)
    start_webhook = webhook_event(row.status, started.status) == "start" and webhooks.wants(
        started, "start"
    )
    waited = None if row.started_at else seconds_between(row.created_at, now)
    return Attempt(
        job_id,
        row.attempt + 1,
        token,
        dict(row.spec),
        row.account_id,
        input_key,
        start_webhook=start_webhook,
        created_at=row.created_at,
        queue_wait_s=waited,
        price=Price(int(row.price), int(row.price_per_output), int(row.outputs_expected)),
    )


def _input_key(conn: Connection, account_id: str, spec: dict[str, Any]) -> str | None:
    from orchestrator.jobs.images import image_key

    image_id = spec.get("image_id")
    if not isinstance(image_id, str):
        return None
    try:
        return image_key(conn, account_id, image_id)
    except OrchestratorError:
        return None


def seconds_between(then: datetime, now: datetime) -> float:
    if then.tzinfo is None:  # SQLite hands back naive UTC
        then = then.replace(tzinfo=UTC)
    return max(0.0, (now - then).total_seconds())
