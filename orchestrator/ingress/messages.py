"""Messages on the `tollgate:jobs` stream: parsing a job request (pure) and the dead-letter
fields of a refusal. The consumer that reads the stream is orchestrator.ingress.intake."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from billing import InsufficientCredits, InvalidJobSpec, UnknownAccount
from orchestrator.jobs import service as jobs
from orchestrator.jobs.images import InvalidImage, UnknownImage
from orchestrator.tables import IDEMPOTENCY_KEY_MAX_LEN

# Base64 of a 20 MiB input image plus the rest of the request.
JOB_TEXT_MAX_BYTES: Final = 32 * 1024 * 1024
ACCOUNT_ID_MAX_LEN: Final = 64
DERIVED_KEY_PREFIX: Final = "msg:"
MESSAGE_FIELDS: Final = frozenset(
    {"account_id", "idempotency_key", "spec", "callback_url", "webhook_events_filter"}
)

# Refusals that no retry can fix: dead-lettered.
PERMANENT_ERRORS: Final = (
    InvalidJobSpec,
    UnknownAccount,
    jobs.IdempotencyConflict,
    jobs.JobRejected,
    InvalidImage,
    UnknownImage,
)


class MalformedMessage(Exception):
    """A message that is not a job request; the text is the dead-letter reason."""


@dataclass(frozen=True)
class JobRequest:
    account_id: str
    idempotency_key: str
    spec: dict[str, Any]
    callback_url: str | None
    key_derived: bool
    # Checked by submit (a bad one is dead-lettered naming the field).
    webhook_events_filter: Any = None  # True: the key is `msg:<message id>`, the client gave none


def derived_key(message_id: str) -> str:
    return f"{DERIVED_KEY_PREFIX}{message_id}"


def message_job_id(stream: str, message_id: str, fields: Mapping[str, Any]) -> str:
    """The job id of a stream message: the same for every delivery of that message, so a
    replay (after a crash between recording a job or a rejection and acknowledging the
    message) finds the row it recorded instead of adding one. The message text is part of
    it, so a stream recreated with reused ids cannot collide with an older job."""
    raw = fields.get("job")
    text = raw if isinstance(raw, str) else ""
    digest = hashlib.sha256(f"{stream}\n{message_id}\n{text}".encode()).hexdigest()
    return "job_" + digest[:24]


def _decode_job_text(fields: Mapping[str, Any]) -> dict[str, Any]:
    raw = fields.get("job")
    if raw is None:
        raise MalformedMessage("missing field 'job'")
    if not isinstance(raw, str):
        raise MalformedMessage("field 'job' must be text")
    if len(raw.encode()) > JOB_TEXT_MAX_BYTES:
        raise MalformedMessage(f"job: larger than {JOB_TEXT_MAX_BYTES} bytes")
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MalformedMessage(f"job: not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise MalformedMessage("job: must be a JSON object")
    return body


def _optional_str(body: Mapping[str, Any], name: str, max_len: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= max_len:
        raise MalformedMessage(f"{name}: must be a string of 1..{max_len} characters")
    return value


def parse_job(fields: Mapping[str, Any], message_id: str) -> JobRequest:
    """Check a stream message's shape (not the spec itself: submit validates that).
    Raises MalformedMessage naming the problem."""
    body = _decode_job_text(fields)
    unknown = sorted(set(body) - MESSAGE_FIELDS)
    if unknown:
        raise MalformedMessage(f"unknown field(s): {', '.join(unknown)}")
    account_id = _optional_str(body, "account_id", ACCOUNT_ID_MAX_LEN)
    if account_id is None:
        raise MalformedMessage("account_id: missing")
    spec = body.get("spec")
    if spec is None:
        raise MalformedMessage("spec: missing")
    if not isinstance(spec, dict):
        raise MalformedMessage("spec: must be a JSON object")
    key = _optional_str(body, "idempotency_key", IDEMPOTENCY_KEY_MAX_LEN)
    callback_url = body.get("callback_url")
    if callback_url is not None and not isinstance(callback_url, str):
        raise MalformedMessage("callback_url: must be a string")
    return JobRequest(
        account_id=account_id,
        idempotency_key=key if key is not None else derived_key(message_id),
        spec=spec,
        callback_url=callback_url,
        key_derived=key is None,
        webhook_events_filter=body.get("webhook_events_filter"),
    )


def best_effort_ids(fields: Mapping[str, Any]) -> dict[str, str]:
    """account_id and idempotency_key of a message that may be malformed (for dead letters,
    so a client can find its own)."""
    try:
        body = json.loads(fields.get("job") or "")
    except (TypeError, ValueError):
        return {}
    if not isinstance(body, dict):
        return {}
    return {
        k: body[k]
        for k in ("account_id", "idempotency_key")
        if isinstance(body.get(k), str) and len(body[k]) <= IDEMPOTENCY_KEY_MAX_LEN
    }


def refusal(exc: Exception) -> dict[str, str]:
    """Dead-letter fields for a permanent refusal: `reason` and `kind`, plus details."""
    if isinstance(exc, MalformedMessage):
        return {"kind": "malformed", "reason": f"malformed message: {exc}"}
    if isinstance(exc, jobs.JobRejected) and isinstance(exc.cause, InsufficientCredits):
        cause = exc.cause
        return {
            "kind": "insufficient_credits",
            "reason": str(cause),
            "job_id": exc.job_id,
            "credit_kind": cause.kind,
            "needed": str(cause.needed),
            "available": str(cause.available),
        }
    if isinstance(exc, InvalidJobSpec | InvalidImage):
        return {"kind": "invalid_spec", "reason": f"invalid {exc}", "field": exc.field}
    if isinstance(exc, UnknownAccount):
        return {"kind": "unknown_account", "reason": str(exc)}
    if isinstance(exc, jobs.IdempotencyConflict):
        return {"kind": "idempotency_conflict", "reason": str(exc)}
    if isinstance(exc, UnknownImage):
        return {"kind": "unknown_image", "reason": f"unknown image {exc}"}
    return {"kind": type(exc).__name__, "reason": str(exc)}
