"""Job webhooks in the Standard Webhooks format (https://www.standardwebhooks.com): which
events a job's callback_url receives, the messages for them, and the record of how the last
delivery went. Sending and signing is workers/callbacks.py (the task `tollgate.callback`).

A message is `{"url", "webhook_id", "body", "job_id"}`; the task POSTs `body` as JSON with
the headers webhook-id, webhook-timestamp and webhook-signature. The id is derived from the
job and the event (`<job_id>.completed`, `<job_id>.start`, `<job_id>.progress.<step>`), so it
is the same on every retry and on a duplicate publish: receivers deduplicate on it."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection, select, update
from sqlalchemy.engine import Row

from billing import InvalidJobSpec
from orchestrator.tables import jobs

EVENTS: Final = ("start", "progress", "completed")
DEFAULT_EVENTS: Final = ("completed",)
# Retries of one delivery after its first try (then it is recorded as failed).
CALLBACK_RETRIES_MAX: Final = 6
# A job's progress webhooks are sent at most this often.
PROGRESS_WEBHOOK_INTERVAL_S: Final = 2.0


def validate_events_filter(value: Any) -> list[str] | None:
    """None (the default: completed only) or a list of distinct events from EVENTS."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or len(value) > len(EVENTS)
        or any(not isinstance(v, str) or v not in EVENTS for v in value)
        or len(set(value)) != len(value)
    ):
        raise InvalidJobSpec(
            "webhook_events_filter",
            f"must be a non-empty list of distinct events from {', '.join(EVENTS)}",
        )
    return [e for e in EVENTS if e in value]  # canonical order


def events_of(row: Row[Any]) -> tuple[str, ...]:
    return tuple(row.webhook_events_filter or DEFAULT_EVENTS)


def wants(row: Row[Any], event: str) -> bool:
    return bool(row.callback_url) and event in events_of(row)


def webhook_id(job_id: str, event: str, step: int | None = None) -> str:
    return f"{job_id}.{event}" if step is None else f"{job_id}.{event}.{step}"


def message(
    row: Row[Any], event: str, data: dict[str, Any], at: datetime, step: int | None = None
) -> dict[str, Any]:
    """The callback task's payload for `event` of the job `row` (with `data`, its view)."""
    return {
        "url": row.callback_url,
        "webhook_id": webhook_id(row.id, event, step),
        "job_id": row.id,
        "body": {"type": f"job.{event}", "timestamp": at.isoformat(), "data": data},
    }


def record_delivery(conn: Connection, job_id: str, delivery: dict[str, Any]) -> None:
    """Keep how the job's last webhook delivery went (shown as `webhook` in the job view).
    A late start or progress delivery never replaces the record of the completed one."""
    current = conn.execute(select(jobs.c.webhook).where(jobs.c.id == job_id)).scalar()
    completed = isinstance(current, dict) and current.get("event") == "completed"
    if completed and delivery.get("event") != "completed":
        return
    conn.execute(update(jobs).where(jobs.c.id == job_id).values(webhook=delivery))


def delivery_view(row: Row[Any]) -> dict[str, Any] | None:
    if not row.callback_url:
        return None
    return {"events": list(events_of(row)), **(row.webhook or {})}
