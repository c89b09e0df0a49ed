"""POST a job's terminal state to its callback_url, signed with HMAC-SHA256, retried with
exponential backoff a bounded number of times (queue tollgate.callbacks)."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import httpx

from orchestrator.settings import get_settings
from workers.app import app

CALLBACK_TIMEOUT_S = 10
CALLBACK_RETRIES_MAX = 6
SIGNATURE_HEADER = "X-Tollgate-Signature"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@app.task(
    name="tollgate.callback",
    bind=True,
    max_retries=CALLBACK_RETRIES_MAX,
    autoretry_for=(httpx.HTTPError,),
    retry_backoff=2,
    retry_backoff_max=600,
    retry_jitter=True,
)
def callback(self: Any, job_id: str, payload: dict[str, Any]) -> int:
    body = json.dumps(payload["job"], sort_keys=True).encode()
    response = httpx.post(
        payload["url"],
        content=body,
        timeout=CALLBACK_TIMEOUT_S,
        headers={
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(get_settings().callback_secret, body),
        },
    )
    response.raise_for_status()
    return response.status_code
