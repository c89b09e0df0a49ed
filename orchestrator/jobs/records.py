"""Job rows: how a job looks to clients, its row lock, and state transitions (each
announced through the outbox). Used by every stage; imports no stage."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection, select, update
from sqlalchemy.engine import Row

from orchestrator.errors import OrchestratorError
from orchestrator.jobs import states, webhooks
from orchestrator.scheduling import outbox, scheduler
from orchestrator.tables import jobs

# States in which a job keeps its dispatch-queue entry (waiting for, or holding, a slot);
# a move to any other state ends the phase. A tune's render enqueues itself again.
SLOT_HOLDING: Final = frozenset({states.QUEUED, states.DISPATCHED, states.RUNNING, states.TRAINING})


class JobNotFound(OrchestratorError):
    pass


# (job id, output index, storage key) -> (a URL that fetches it, when that URL expires).
OutputSigner = Callable[[str, int, str], tuple[str, datetime]]


def output_path(job_id: str, index: int) -> str:
    """The authenticated route of an output (Bearer API key)."""
    return f"/v1/jobs/{job_id}/outputs/{index}"


def view(row: Row[Any], sign: OutputSigner | None = None) -> dict[str, Any]:
    """A job as clients see it (the API's and the events' shape). With `sign` (the API
    edge), each stored output's `url` is an expiring one that needs no API key; without it,
    the authenticated route. Outputs deleted by retention have no `url`."""
    deleted = row.outputs_deleted_at is not None
    outputs = []
    for o in row.outputs or []:
        if not o.get("delivered"):
            continue
        url: str | None = output_path(row.id, o["index"])
        expires_at: str | None = None
        if deleted:
            url = None
        elif sign is not None and o.get("key"):
            url, expiry = sign(row.id, o["index"], o["key"])
            expires_at = expiry.isoformat()
        outputs.append(
            {
                "index": o["index"],
                "url": url,
                "expires_at": expires_at,
                "api_url": output_path(row.id, o["index"]),
                "deleted": deleted,
                **{k: o[k] for k in ("seed", "meta") if k in o},
            }
        )
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
        "outputs_deleted_at": row.outputs_deleted_at.isoformat() if deleted else None,
        "webhook": webhooks.delivery_view(row),
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
    client's webhook for `start` and `completed` when its events filter asks for them).
    `current` is the status the caller read under the lock, when it has it (saves a read)."""
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
    messages: list[tuple[str, dict[str, Any]]] = [("event", event_payload(row))]
    event = webhook_event(current, new_status)
    if event is not None and webhooks.wants(row, event):
        messages.append(("callback", webhooks.message(row, event, view(row), now)))
    outbox.add_many(conn, job_id, messages)
    return row


def webhook_event(current: str, new: str) -> str | None:
    if states.is_terminal(new):
        return "completed"
    if new in (states.RUNNING, states.TRAINING) and current in (states.QUEUED, states.DISPATCHED):
        return "start"
    return None


def get_row(conn: Connection, account_id: str | None, job_id: str) -> Row[Any]:
    stmt = select(jobs).where(jobs.c.id == job_id)
    if account_id is not None:
        stmt = stmt.where(jobs.c.account_id == account_id)
    row = conn.execute(stmt).first()
    if row is None:
        raise JobNotFound(job_id)
    return row
