"""Job rows: how a job looks to clients, its row lock, and state transitions (each
announced through the outbox). Used by every stage; imports no stage."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection, select, update
from sqlalchemy.engine import Row

from orchestrator.errors import OrchestratorError
from orchestrator.jobs import states
from orchestrator.scheduling import outbox, scheduler
from orchestrator.tables import jobs

# States in which a job keeps its dispatch-queue entry (waiting for, or holding, a slot);
# a move to any other state ends the phase. A tune's render enqueues itself again.
SLOT_HOLDING: Final = frozenset({states.QUEUED, states.DISPATCHED, states.RUNNING, states.TRAINING})


class JobNotFound(OrchestratorError):
    pass


def view(row: Row[Any]) -> dict[str, Any]:
    """A job as clients see it (the API's and the events' shape)."""
    outputs = [
        {
            "index": o["index"],
            "url": f"/v1/jobs/{row.id}/outputs/{o['index']}",
            **{k: o[k] for k in ("seed", "meta") if k in o},
        }
        for o in (row.outputs or [])
        if o.get("delivered")
    ]
    undelivered = [
        {"index": o["index"], "reason": o.get("reason")}
        for o in (row.outputs or [])
        if not o.get("delivered")
    ]
    return {
        "id": row.id,
        "account_id": row.account_id,
        "type": row.type,
        "status": row.status,
        "progress": {"step": row.progress_step, "total": row.progress_total},
        "price": {"credits": row.price, "credit_kind": row.credit_kind},
        "charged": row.charged,
        "refunded": row.refunded,
        "outputs": outputs,
        "undelivered": undelivered,
        "error": row.error,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
        "started_at": row.started_at.isoformat() if row.started_at else None,
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
    }


def event_payload(row: Row[Any]) -> dict[str, Any]:
    return {
        "job_id": row.id,
        "account_id": row.account_id,
        "type": row.type,
        "status": row.status,
        "charged": row.charged,
        "refunded": row.refunded,
        "error": row.error or "",
        "at": row.updated_at.isoformat(),
    }


def lock_job(conn: Connection, job_id: str) -> Row[Any]:
    row = conn.execute(select(jobs).where(jobs.c.id == job_id).with_for_update()).first()
    if row is None:
        raise JobNotFound(job_id)
    return row


def transition(
    conn: Connection,
    job_id: str,
    new_status: str,
    now: datetime,
    *,
    current: str | None = None,
    **values: Any,
) -> Row[Any]:
    """Move a locked job to `new_status`, announcing it through the outbox (event, and the
    client's callback when the new state is terminal). `current` is the status the caller
    read under the lock, when it has it (saves a read)."""
    if current is None:
        current = conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one()
    if current != new_status and not states.can_transition(current, new_status):
        raise OrchestratorError(f"job {job_id}: {current} -> {new_status} is not allowed")
    if states.is_terminal(new_status):
        values.setdefault("finished_at", now)
    row = conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id)
        .values(status=new_status, updated_at=now, **values)
        .returning(*jobs.c)
    ).one()
    if new_status != current and new_status not in SLOT_HOLDING:
        scheduler.release(conn, job_id, now)  # the phase ended: its slot or place is free
    elif current == states.QUEUED and new_status != current:
        scheduler.taken(conn, job_id, now)  # a task that was sent around the scheduler
    messages = [("event", event_payload(row))]
    if states.is_terminal(new_status) and row.callback_url:
        messages.append(("callback", {"url": row.callback_url, "job": view(row)}))
    outbox.add_many(conn, job_id, messages)
    return row


def get_row(conn: Connection, account_id: str | None, job_id: str) -> Row[Any]:
    stmt = select(jobs).where(jobs.c.id == job_id)
    if account_id is not None:
        stmt = stmt.where(jobs.c.account_id == account_id)
    row = conn.execute(stmt).first()
    if row is None:
        raise JobNotFound(job_id)
    return row
