"""Webhook deliveries in the Standard Webhooks format (queue tollgate.callbacks).

The task is generic: `callback(webhook_id, payload)` POSTs `payload["body"]` as JSON to
`payload["url"]`, signed with TOLLGATE_CALLBACK_SECRET (a `whsec_` secret) in the headers
webhook-id, webhook-timestamp and webhook-signature. The id is the caller's and stays the same
on every retry (receivers deduplicate on it); the timestamp and signature are made per
attempt. Anything but a 2xx is retried with exponential backoff, CALLBACK_RETRIES_MAX times.
When the payload names a `job_id`, each outcome is recorded on the job (`webhook` in the job
view): attempts, the last HTTP status, and `failed_at` after the last retry."""

from __future__ import annotations

import json
import logging
import random
from datetime import UTC, datetime
from typing import Any, Final

import httpx
from standardwebhooks import Webhook

from billing.db import run_transaction
from orchestrator.db import get_engine
from orchestrator.jobs import webhooks
from orchestrator.jobs.webhooks import CALLBACK_RETRIES_MAX
from orchestrator.settings import get_settings
from workers.app import app

log = logging.getLogger(__name__)

CALLBACK_TIMEOUT_S: Final = 10
CALLBACK_BACKOFF_MAX_S: Final = 600
ERROR_MAX_CHARS: Final = 300


class WebhookConfigError(Exception):
    pass


def signed_headers(secret: str, webhook_id: str, body: str, at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers for `body` sent as `webhook_id` at `at`."""
    if not secret.startswith("whsec_"):
        raise WebhookConfigError("TOLLGATE_CALLBACK_SECRET must be a whsec_ secret")
    return {
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, at, body),
    }


def backoff_s(retries: int) -> float:
    base = get_settings().callback_backoff_s
    return float(min(CALLBACK_BACKOFF_MAX_S, base * 2**retries) * random.uniform(0.5, 1.0))


@app.task(name="tollgate.callback", bind=True, max_retries=CALLBACK_RETRIES_MAX)
def callback(self: Any, webhook_id: str, payload: dict[str, Any]) -> int | None:
    body = json.dumps(payload["body"], sort_keys=True, separators=(",", ":"))
    attempts = self.request.retries + 1
    at = datetime.now(UTC)
    status: int | None = None
    try:
        headers = signed_headers(get_settings().callback_secret, webhook_id, body, at)
        response = httpx.post(
            payload["url"], content=body, headers=headers, timeout=CALLBACK_TIMEOUT_S
        )
        status = response.status_code
        response.raise_for_status()
    except (httpx.HTTPError, WebhookConfigError) as exc:
        last = self.request.retries >= CALLBACK_RETRIES_MAX or isinstance(exc, WebhookConfigError)
        outcome = {"last_status": status, "attempts": attempts, "last_error": _short(exc)}
        _record(payload, webhook_id, {**outcome, "failed_at": at.isoformat() if last else None})
        if last:
            return None
        raise self.retry(exc=exc, countdown=backoff_s(self.request.retries)) from None
    _record(
        payload,
        webhook_id,
        {"last_status": status, "attempts": attempts, "delivered_at": at.isoformat()},
    )
    return status


def _short(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:ERROR_MAX_CHARS]


def _record(payload: dict[str, Any], webhook_id: str, outcome: dict[str, Any]) -> None:
    """Best effort: a database error here must not stop the retries of the delivery."""
    job_id = payload.get("job_id")
    if not job_id:
        return
    event = str(payload["body"].get("type", "")).removeprefix("job.")
    delivery = {"id": webhook_id, "event": event, **outcome}
    try:
        run_transaction(get_engine(), lambda c: webhooks.record_delivery(c, job_id, delivery))
    except Exception:
        log.exception("webhook %s: recording the delivery on job %s failed", webhook_id, job_id)
