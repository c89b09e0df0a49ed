"""A small Python client for the Redis intake: submit a job to `tollgate:jobs` and follow it
on `tollgate:events` to its end.

    client = TollgateClient("redis://localhost:6379/0")
    sub = client.submit("acct_...", {"type": "txt2img", "prompt": "a lighthouse"})
    outcome = client.wait(sub, timeout_s=600, on_progress=lambda step, total: ...)

`submit` remembers where the events and dead-letter streams ended before the XADD, so `wait`
reads everything that happened after it: the intake's `accepted` event (which maps the
idempotency key to a job id), the job's state changes and progress, or a dead letter for the
message (raised as `DeadLettered`, with the intake's reason). Both streams are capped, so a
`wait` on a job that ended long ago (or without a `submit` from this client) may time out.

Receiving webhooks: `verify_webhook(body, headers, secret)` checks a delivery's Standard
Webhooks signature and age and returns the message (`{"type", "timestamp", "data"}`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import redis
import standardwebhooks

from orchestrator.events import EVENTS_STREAM
from orchestrator.ingress.streams import DEAD_STREAM, JOBS_STREAM
from orchestrator.jobs import states

READ_COUNT: Final = 500
READ_BLOCK_MS_MAX: Final = 1_000
# Terminal events of jobs not (yet) known to be ours, kept in case the `accepted` event
# arrives after them.
UNMATCHED_MAX: Final = 10_000
GENERATED_KEY_PREFIX: Final = "client-"

WebhookVerificationError = standardwebhooks.WebhookVerificationError

ProgressCallback = Callable[[int, int], None]
StatusCallback = Callable[[str, str], None]  # (job_id, status)


class ClientError(Exception):
    """Root of the errors this client raises."""


class DeadLettered(ClientError):
    """The intake refused the message; `reason` says why, `fields` is the dead letter."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self.fields = dict(fields)
        self.reason = self.fields.get("reason", "no reason given")
        self.kind = self.fields.get("kind", "")
        self.job_id = self.fields.get("job_id") or None  # a `rejected` job, if one was recorded
        super().__init__(f"job refused by the intake: {self.reason}")


class WaitTimeout(ClientError, TimeoutError):
    pass


@dataclass(frozen=True)
class Submission:
    message_id: str
    idempotency_key: str
    account_id: str
    events_from: str
    dead_from: str


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: str
    event: dict[str, str]

    @property
    def succeeded(self) -> bool:
        return self.status == states.SUCCEEDED


def verify_webhook(payload: bytes | str, headers: Mapping[str, str], secret: str) -> dict[str, Any]:
    """Verify a Tollgate webhook delivery (Standard Webhooks: the webhook-id,
    webhook-timestamp and webhook-signature headers, a `whsec_` secret) and return the parsed
    message. Raises WebhookVerificationError for a bad or missing signature, or a timestamp
    more than 5 minutes off. Deduplicate on headers["webhook-id"]: it is the same on retries."""
    message: dict[str, Any] = standardwebhooks.Webhook(secret).verify(payload, dict(headers))
    return message


def new_idempotency_key() -> str:
    return f"{GENERATED_KEY_PREFIX}{uuid.uuid4().hex}"


def job_message(
    account_id: str,
    spec: Mapping[str, Any],
    idempotency_key: str,
    callback_url: str | None,
    webhook_events_filter: list[str] | None = None,
) -> str:
    body: dict[str, Any] = {
        "account_id": account_id,
        "idempotency_key": idempotency_key,
        "spec": dict(spec),
    }
    if callback_url is not None:
        body["callback_url"] = callback_url
    if webhook_events_filter is not None:
        body["webhook_events_filter"] = list(webhook_events_filter)
    return json.dumps(body, separators=(",", ":"))


class Tracker:
    """Follows one submission through event and dead-letter entries (no I/O)."""

    def __init__(
        self,
        *,
        job_id: str | None = None,
        idempotency_key: str | None = None,
        message_id: str | None = None,
        account_id: str | None = None,
        on_progress: ProgressCallback | None = None,
        on_status: StatusCallback | None = None,
    ) -> None:
        self.job_id = job_id
        self.key = idempotency_key
        self.message_id = message_id
        self.account_id = account_id
        self.on_progress = on_progress
        self.on_status = on_status
        self.accepted = False
        self._last_status: str | None = None
        self._unmatched: OrderedDict[str, dict[str, str]] = OrderedDict()

    def _is_ours(self, fields: Mapping[str, str]) -> bool:
        if self.message_id is not None and fields.get("message_id") == self.message_id:
            return True
        if self.key is None or fields.get("idempotency_key") != self.key:
            return False
        return self.account_id is None or fields.get("account_id") == self.account_id

    def dead_letter(self, fields: Mapping[str, str]) -> None:
        """Raises DeadLettered when the entry is this submission's."""
        if self.job_id is None and self._is_ours(fields):
            raise DeadLettered(fields)

    def event(self, fields: Mapping[str, str]) -> JobOutcome | None:
        """Feed one event; returns the outcome once the job has ended."""
        if fields.get("status") == "accepted":
            return self._accepted(fields)
        job_id = fields.get("job_id", "")
        if self.job_id is None:
            if states.is_terminal(fields.get("status", "")):
                self._remember(job_id, fields)
            return None
        if job_id != self.job_id:
            return None
        return self._own_event(fields)

    def _accepted(self, fields: Mapping[str, str]) -> JobOutcome | None:
        if self.job_id is not None and fields.get("job_id") != self.job_id:
            return None
        if self.job_id is None and not self._is_ours(fields):
            return None
        self.job_id = fields["job_id"]
        self.accepted = True
        self._status(fields.get("job_status", "accepted"))
        if states.is_terminal(fields.get("job_status", "")):
            return JobOutcome(self.job_id, fields["job_status"], dict(fields))
        earlier = self._unmatched.pop(self.job_id, None)
        return self._own_event(earlier) if earlier is not None else None

    def _own_event(self, fields: Mapping[str, str]) -> JobOutcome | None:
        assert self.job_id is not None
        status = fields.get("status", "")
        if fields.get("step") and fields.get("total") and self.on_progress is not None:
            self.on_progress(int(fields["step"]), int(fields["total"]))
        self._status(status)
        if states.is_terminal(status):
            return JobOutcome(self.job_id, status, dict(fields))
        return None

    def _status(self, status: str) -> None:
        if status and status != self._last_status:
            self._last_status = status
            if self.on_status is not None and self.job_id is not None:
                self.on_status(self.job_id, status)

    def _remember(self, job_id: str, fields: Mapping[str, str]) -> None:
        self._unmatched[job_id] = dict(fields)
        while len(self._unmatched) > UNMATCHED_MAX:
            self._unmatched.popitem(last=False)


class TollgateClient:
    def __init__(
        self,
        redis_url: str | None = None,
        *,
        client: redis.Redis | None = None,
        jobs_stream: str = JOBS_STREAM,
        dead_stream: str = DEAD_STREAM,
        events_stream: str = EVENTS_STREAM,
    ) -> None:
        if client is None:
            if not redis_url:
                raise ValueError("give a redis_url or a client")
            client = redis.Redis.from_url(redis_url, decode_responses=True)
        self.redis = client
        self.jobs_stream = jobs_stream
        self.dead_stream = dead_stream
        self.events_stream = events_stream
        self._submissions: OrderedDict[str, Submission] = OrderedDict()

    def _last_id(self, stream: str) -> str:
        last: Any = self.redis.xrevrange(stream, count=1)
        return str(last[0][0]) if last else "0-0"

    def submit(
        self,
        account_id: str,
        spec: Mapping[str, Any],
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        webhook_events_filter: list[str] | None = None,
    ) -> Submission:
        """XADD the job; returns the message id and the idempotency key (generated when none
        is given), plus where `wait` starts reading."""
        key = idempotency_key or new_idempotency_key()
        events_from = self._last_id(self.events_stream)
        dead_from = self._last_id(self.dead_stream)
        message_id = self.redis.xadd(
            self.jobs_stream,
            {"job": job_message(account_id, spec, key, callback_url, webhook_events_filter)},
        )
        submission = Submission(str(message_id), key, account_id, events_from, dead_from)
        self._submissions[key] = submission
        while len(self._submissions) > UNMATCHED_MAX:
            self._submissions.popitem(last=False)
        return submission

    def _tracker_for(
        self,
        target: Submission | str,
        on_progress: ProgressCallback | None,
        on_status: StatusCallback | None,
    ) -> tuple[Tracker, str, str]:
        callbacks: dict[str, Any] = {"on_progress": on_progress, "on_status": on_status}
        if isinstance(target, str) and target.startswith("job_"):
            return Tracker(job_id=target, **callbacks), "0-0", "0-0"
        sub = target if isinstance(target, Submission) else self._submissions.get(target)
        if sub is None:  # a key this client did not submit: read the retained streams
            return Tracker(idempotency_key=str(target), **callbacks), "0-0", "0-0"
        tracker = Tracker(
            idempotency_key=sub.idempotency_key,
            message_id=sub.message_id,
            account_id=sub.account_id,
            **callbacks,
        )
        return tracker, sub.events_from, sub.dead_from

    def wait(
        self,
        target: Submission | str,
        timeout_s: float,
        on_progress: ProgressCallback | None = None,
        *,
        on_status: StatusCallback | None = None,
    ) -> JobOutcome:
        """Follow a submission (or a job id, or an idempotency key) until the job ends.
        Raises DeadLettered when the intake refused it, WaitTimeout after `timeout_s`."""
        tracker, events_pos, dead_pos = self._tracker_for(target, on_progress, on_status)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            block = max(1, min(READ_BLOCK_MS_MAX, int(left * 1000)))
            reply: Any = self.redis.xread(
                {self.events_stream: events_pos, self.dead_stream: dead_pos},
                count=READ_COUNT,
                block=block,
            )
            for stream, entries in reply or []:
                for entry_id, fields in entries:
                    if stream == self.dead_stream:
                        dead_pos = entry_id
                        tracker.dead_letter(fields)
                        continue
                    events_pos = entry_id
                    outcome = tracker.event(fields)
                    if outcome is not None:
                        return outcome
        raise WaitTimeout(f"no end for {tracker.job_id or tracker.key} within {timeout_s:g} s")

    def close(self) -> None:
        self.redis.close()
