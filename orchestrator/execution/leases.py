"""Leases: a running attempt holds its job for `lease_ttl_s`, renewed by a heartbeat in the
worker (orchestrator.execution.heartbeat) every `lease_renew_interval_s`, whatever the runner
does. A lease that expires means the worker is gone (killed, preempted, partitioned): the
lease sweep (orchestrator.settlement.lease_sweep) takes the job back.

This module: whether a lease is live, and the attempts record (`job_attempts`: worker,
start, end, outcome per attempt), listed by `GET /v1/jobs/{id}` and `tollgate jobs show`.
"""

from __future__ import annotations

import contextlib
import os
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.engine import Row

from orchestrator.jobs import states
from orchestrator.settings import get_settings
from orchestrator.tables import job_attempts

# Attempts per phase of a job: after this many lost workers it fails and is refunded (a
# poison job cannot loop forever).
ATTEMPTS_MAX: Final = 3
# Statuses a lease applies to: an attempt is running.
LEASED: Final = frozenset({states.RUNNING, states.TRAINING, states.RENDERING})
# Attempt outcomes besides the job outcomes (succeeded, failed, canceled).
LEASE_EXPIRED: Final = "lease_expired"
WORKER_LOST: Final = "worker_lost"
SUPERSEDED: Final = "superseded"
LATE: Final = "late"
DETAIL_MAX_LEN: Final = 500


def lease_expiry(now: datetime) -> datetime:
    return now + timedelta(seconds=get_settings().lease_ttl_s)


def is_live(row: Row[Any], now: datetime) -> bool:
    """Whether an attempt holds the job's lease now."""
    return (
        row.status in LEASED
        and row.lease_token is not None
        and row.lease_expires_at is not None
        and row.lease_expires_at > now
    )


def is_expired(row: Row[Any], now: datetime) -> bool:
    """A running attempt whose lease ran out (its worker is presumed dead)."""
    return (
        row.status in LEASED
        and row.lease_token is not None
        and row.lease_expires_at is not None
        and row.lease_expires_at <= now
    )


def holder_gone(row: Row[Any], worker: str) -> bool:
    """The lease is held by a process of this same worker node that no longer exists (a
    killed pool child whose task Celery redelivered): no need to wait for the TTL."""
    if row.worker != worker[:200] or row.worker_pid is None or row.worker_pid == os.getpid():
        return False
    return not _process_alive(int(row.worker_pid))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead too (Linux)
    return True


# --------------------------------------------------------------------- attempts


def start_attempt(
    conn: Connection, row: Row[Any], phase: str, number: int, worker: str, now: datetime
) -> None:
    """Record attempt `number` of `phase` (the caller holds the job's row lock)."""
    exists = conn.execute(
        select(job_attempts.c.id).where(
            job_attempts.c.job_id == row.id,
            job_attempts.c.phase == phase,
            job_attempts.c.number == number,
        )
    ).first()
    values = {"worker": worker[:200], "worker_pid": os.getpid(), "started_at": now}
    if exists is not None:  # a phase started over (a tune rendering again): latest wins
        conn.execute(
            update(job_attempts)
            .where(job_attempts.c.id == exists.id)
            .values(ended_at=None, outcome=None, detail=None, **values)
        )
        return
    conn.execute(insert(job_attempts).values(job_id=row.id, phase=phase, number=number, **values))


def end_attempt(
    conn: Connection,
    job_id: str,
    phase: str,
    number: int,
    outcome: str,
    now: datetime,
    detail: str | None = None,
) -> None:
    """Close an attempt that is still open (the first ending recorded wins)."""
    conn.execute(
        update(job_attempts)
        .where(
            job_attempts.c.job_id == job_id,
            job_attempts.c.phase == phase,
            job_attempts.c.number == number,
            job_attempts.c.ended_at.is_(None),
        )
        .values(ended_at=now, outcome=outcome, detail=(detail or None) and detail[:DETAIL_MAX_LEN])
    )


def attempts(conn: Connection, job_id: str) -> list[dict[str, Any]]:
    """A job's attempts, oldest first, as operators see them."""
    rows = conn.execute(
        select(job_attempts)
        .where(job_attempts.c.job_id == job_id)
        .order_by(job_attempts.c.started_at, job_attempts.c.id)
    ).all()
    return [
        {
            "number": r.number,
            "phase": r.phase,
            "worker": r.worker,
            "started_at": r.started_at.isoformat(),
            "ended_at": r.ended_at.isoformat() if r.ended_at else None,
            "outcome": r.outcome,
            "detail": r.detail,
        }
        for r in rows
    ]
