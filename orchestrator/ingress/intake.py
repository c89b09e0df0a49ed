"""The Redis-queue intake: a consumer group on `tollgate:jobs` that turns messages into jobs.

Clients `XADD tollgate:jobs * job '<json>'` with
`{"account_id": ..., "idempotency_key": ..., "spec": {...}, "callback_url": optional}`.
Each message is parsed, submitted (price, hold, job row, outbox: a round's messages in one
transaction per account, each with its own outcome; orchestrator.jobs.submission_batch) and
relayed; then the intake appends an `accepted` event to `tollgate:events` (job_id,
job_status, idempotency_key, message_id) and acknowledges the message.

Delivery is at least once, and duplicate processing is harmless: submit is idempotent on the
message's idempotency key. A message without a key gets one derived from its stream message
id (`msg:<id>`), so a redelivered or re-claimed message never creates a second job.

Messages that can never succeed (malformed, invalid spec, insufficient credits, unknown
account, idempotency conflict, bad image) go to `tollgate:jobs:dead` (original `job` text,
`reason`, `message_id`, `consumer`, plus what could be parsed) and are acknowledged, in one
MULTI. Anything else (database or Redis down, a bug) leaves the message unacknowledged: the
consumer backs off until its dependencies answer, then retries its own pending messages.
Pending messages of a dead consumer are taken over with XAUTOCLAIM after `claim_min_idle_ms`;
a message delivered more than `max_deliveries` times is dead-lettered as poison.

Acknowledged messages are also deleted (XDEL), so the jobs stream only holds messages not yet
handled; the dead-letter stream is capped at `DEAD_MAXLEN` entries (approximately).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

import redis
from sqlalchemy import Engine, text
from sqlalchemy.exc import InterfaceError, OperationalError

from orchestrator.events import EVENTS_MAXLEN, EVENTS_STREAM
from orchestrator.faults import REDIS, count_retry, dependency_of
from orchestrator.ingress.messages import (
    PERMANENT_ERRORS,
    JobRequest,
    MalformedMessage,
    best_effort_ids,
    message_job_id,
    parse_job,
    refusal,
)
from orchestrator.ingress.streams import IntakeConfig
from orchestrator.jobs import service as jobs
from orchestrator.jobs import submission_batch
from orchestrator.scheduling.outbox import Publisher
from orchestrator.scheduling.scheduler import nudge
from orchestrator.storage import Storage
from orchestrator.tunes import service as _tunes  # noqa: F401  (registers the tune family)

log = logging.getLogger(__name__)

# Outages: logged without a traceback. Any other error is retried too (and bounded by
# `max_deliveries`), with a traceback.
TRANSIENT_ERRORS: Final = (OperationalError, InterfaceError, redis.RedisError, OSError)


# --- the consumer -----------------------------------------------------------------------


class Outcome(Enum):
    DEAD = "dead"
    RETRY = "retry"


@dataclass(frozen=True)
class Accepted:
    """A message submitted as a job, not yet announced or acknowledged."""

    request: JobRequest
    job: dict[str, Any]


@dataclass
class Stats:
    accepted: int = 0
    dead: int = 0
    retried: int = 0
    claimed: int = 0


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


Message = tuple[str, dict[str, Any] | None]


@dataclass
class Consumer:
    """One member of the intake consumer group. `run()` loops until `stop()`; `step()` does
    one round (own pending after a failure, claims, new messages) for tests."""

    engine: Engine
    storage: Storage
    redis: redis.Redis
    publish: Publisher
    name: str = field(default_factory=default_consumer_name)
    config: IntakeConfig = field(default_factory=IntakeConfig)
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._recheck_own = True  # at start: messages a previous run under this name left
        self._claim_cursor = "0-0"
        self._next_claim_at = 0.0
        self._backoff_s = 0.0
        self._group_ready = False

    # -- lifecycle --

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.config.stream, self.config.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def run(self) -> Stats:
        log.info("intake %s reading %s", self.name, self.config.stream)
        while not self.stopping:
            if self._backoff_s and not self._healthy_after_backoff():
                continue
            try:
                self.step()
            except (redis.RedisError, OSError) as exc:
                log.warning("intake %s: redis unavailable (%s); backing off", self.name, exc)
                count_retry(REDIS)
                self._group_ready = False  # NOGROUP: the stream was deleted; create it again
                self._fail()
                continue
            if not self._recheck_own:  # the round went through
                self._backoff_s = 0.0
        self._leave_group()
        log.info("intake %s stopped: %s", self.name, self.stats)
        return self.stats

    def step(self) -> int:
        """One round; returns how many messages were handled."""
        if not self._group_ready:
            self.ensure_group()
        if self._recheck_own:
            own = self._read(own_pending=True)
            # A full batch: there may be more; read own pending again next round.
            self._recheck_own = len(own) >= self.config.batch_size
            return self._handle_all(own, check_deliveries=True)
        handled = 0
        if time.monotonic() >= self._next_claim_at:
            self._next_claim_at = time.monotonic() + self.config.claim_interval_s
            # Claim only while the database answers: during an outage, claims would only
            # raise delivery counts towards the poison bound.
            if self.probe() is None:
                handled += self._handle_all(self._claim(), check_deliveries=True)
        if not self.stopping and not self._recheck_own:
            handled += self._handle_all(self._read(own_pending=False), check_deliveries=False)
        return handled

    # -- reading --

    def _read(self, *, own_pending: bool) -> list[Message]:
        reply: Any = self.redis.xreadgroup(
            self.config.group,
            self.name,
            {self.config.stream: "0" if own_pending else ">"},
            count=self.config.batch_size,
            block=None if own_pending else self.config.block_ms,
        )
        if not reply:
            return []
        _stream, messages = reply[0]
        return list(messages)

    def _claim(self) -> list[Message]:
        reply: Any = self.redis.xautoclaim(
            self.config.stream,
            self.config.group,
            self.name,
            self.config.claim_min_idle_ms,
            start_id=self._claim_cursor,
            count=self.config.claim_count,
        )
        self._claim_cursor = reply[0]
        claimed = [(mid, fields) for mid, fields in reply[1] if mid is not None]
        self.stats.claimed += len(claimed)
        if claimed:
            log.info("intake %s claimed %d idle message(s)", self.name, len(claimed))
        return claimed

    def _deliveries(self, message_id: str) -> int:
        rows = self.redis.xpending_range(
            self.config.stream, self.config.group, min=message_id, max=message_id, count=1
        )
        return int(rows[0]["times_delivered"]) if rows else 0

    # -- handling --

    def _handle_all(self, messages: Iterable[Message], *, check_deliveries: bool) -> int:
        """Submit the messages as one batch (each with its own outcome: orchestrator.jobs.
        submission_batch); then, once for the batch, announce and acknowledge the accepted
        ones (one MULTI) and publish their outbox rows (one relay)."""
        handled = 0
        accepted: list[tuple[str, JobRequest, dict[str, Any]]] = []
        try:
            parsed: list[tuple[str, Mapping[str, Any], JobRequest]] = []
            for message_id, fields in messages:
                if self.stopping:
                    break  # graceful stop: the rest stay pending, to be re-read or claimed
                handled += 1
                if fields is None:  # deleted while pending: nothing to do
                    self._ack(message_id)
                    continue
                if check_deliveries and self._is_poison(message_id, fields):
                    continue
                request = self._parse(message_id, fields)
                if request is not None:
                    parsed.append((message_id, fields, request))
            outcomes = self._submit(parsed)
            retry = False
            for (mid, given, request), outcome in zip(parsed, outcomes, strict=True):
                result = self._settle(mid, given, request, outcome)
                if isinstance(result, Accepted):
                    accepted.append((mid, result.request, result.job))
                elif result is Outcome.RETRY:
                    retry = True
            if retry:
                self._fail()
        finally:
            # Also after an error: what was submitted is announced, acknowledged and published
            # (if this fails, the messages stay pending and are resubmitted idempotently).
            if accepted:
                self._announce_and_ack(accepted)
                nudge(self.engine, self.publish, [job["id"] for _, _, job in accepted])
        return handled

    def _is_poison(self, message_id: str, fields: Mapping[str, Any]) -> bool:
        deliveries = self._deliveries(message_id)
        if deliveries <= self.config.max_deliveries:
            return False
        reason = (
            f"poison message: delivered {deliveries} times "
            f"(more than {self.config.max_deliveries}) without being handled"
        )
        self._dead_letter(message_id, fields, {"kind": "poison", "reason": reason})
        return True

    def handle(self, message_id: str, fields: Mapping[str, Any]) -> Accepted | Outcome:
        """Parse and submit one message; a refusal is dead-lettered here. The caller announces,
        acknowledges and relays what was accepted."""
        request = self._parse(message_id, fields)
        if request is None:
            return Outcome.DEAD
        [outcome] = self._submit([(message_id, fields, request)])
        return self._settle(message_id, fields, request, outcome)

    def _parse(self, message_id: str, fields: Mapping[str, Any]) -> JobRequest | None:
        """The message's request, or None once a malformed one is dead-lettered."""
        try:
            return parse_job(fields, message_id)
        except (MalformedMessage, *PERMANENT_ERRORS) as exc:
            self._dead_letter(message_id, fields, refusal(exc))
            return None

    def _submit(
        self, parsed: list[tuple[str, Mapping[str, Any], JobRequest]]
    ) -> list[submission_batch.Outcome]:
        requests = [
            submission_batch.Request(
                request.account_id,
                request.spec,
                message_job_id(self.config.stream, message_id, fields),
                idempotency_key=request.idempotency_key,
                callback_url=request.callback_url,
                webhook_events_filter=request.webhook_events_filter,
                source="redis",
            )
            for message_id, fields, request in parsed
        ]
        if not requests:
            return []
        try:
            return submission_batch.submit_many(self.engine, self.storage, requests)
        except Exception as exc:  # a bug in the batch itself: every message retries
            log.warning("intake %s: batch submit failed", self.name, exc_info=True)
            return [exc] * len(requests)

    def _settle(
        self,
        message_id: str,
        fields: Mapping[str, Any],
        request: JobRequest,
        outcome: submission_batch.Outcome,
    ) -> Accepted | Outcome:
        """A submit's outcome: accepted, dead-lettered (a permanent refusal) or left pending."""
        if isinstance(outcome, jobs.Submitted):
            self.stats.accepted += 1
            return Accepted(request, outcome.job)
        if isinstance(outcome, PERMANENT_ERRORS):
            self._dead_letter(message_id, fields, refusal(outcome))
            return Outcome.DEAD
        expected = isinstance(outcome, TRANSIENT_ERRORS)  # no traceback for an outage
        dependency = dependency_of(outcome)
        if dependency is not None:
            count_retry(dependency)
        log.warning(
            "intake %s: %s left pending: %s",
            self.name,
            message_id,
            outcome,
            exc_info=None if expected else outcome,
        )
        self.stats.retried += 1
        return Outcome.RETRY

    def _announce_and_ack(self, accepted: list[tuple[str, JobRequest, dict[str, Any]]]) -> None:
        """The `accepted` events go before the relay, so a reader that learns a job id from one
        sees the job's own events after it (or finds the job already terminal)."""
        pipe = self.redis.pipeline(transaction=True)
        for message_id, request, job in accepted:
            event = {
                "status": "accepted",
                "job_id": job["id"],
                "job_status": job["status"],
                "account_id": request.account_id,
                "idempotency_key": request.idempotency_key,
                "message_id": message_id,
            }
            pipe.xadd(EVENTS_STREAM, event, maxlen=EVENTS_MAXLEN, approximate=True)  # type: ignore[arg-type]
            self._queue_ack(pipe, message_id)
        pipe.execute()

    def _dead_letter(
        self, message_id: str, fields: Mapping[str, Any], detail: Mapping[str, str]
    ) -> None:
        raw = fields.get("job")
        entry = {
            **best_effort_ids(fields),
            **detail,
            "job": raw if isinstance(raw, str) else "",
            "message_id": message_id,
            "consumer": self.name,
        }
        log.info("intake %s: %s dead-lettered: %s", self.name, message_id, detail["reason"])
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            self.config.dead_stream,
            entry,  # type: ignore[arg-type]
            maxlen=self.config.dead_maxlen,
            approximate=True,
        )
        self._queue_ack(pipe, message_id)
        pipe.execute()
        self.stats.dead += 1

    def _queue_ack(self, pipe: Any, message_id: str) -> None:
        pipe.xack(self.config.stream, self.config.group, message_id)
        pipe.xdel(self.config.stream, message_id)

    def _ack(self, message_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        self._queue_ack(pipe, message_id)
        pipe.execute()

    # -- failures --

    def _fail(self) -> None:
        """Something transient failed: back off (doubling) before touching messages again,
        then start over with this consumer's own pending messages."""
        self._backoff_s = min(
            self.config.backoff_max_s, max(self.config.backoff_initial_s, self._backoff_s * 2)
        )
        self._recheck_own = True

    def _healthy_after_backoff(self) -> bool:
        """Sleep the back-off, then probe PostgreSQL and Redis. Unhealthy: back off further
        without redelivering anything, so an outage does not count towards the poison bound."""
        self._stop.wait(self._backoff_s)
        if self.stopping:
            return False
        problem = self.probe()
        if problem is not None:
            log.warning("intake %s: still unhealthy (%s)", self.name, problem)
            self._fail()
            return False
        return True

    def probe(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            return f"database: {exc.__class__.__name__}"
        try:
            self.redis.ping()
        except (redis.RedisError, OSError) as exc:
            return f"redis: {exc.__class__.__name__}"
        return None

    def _leave_group(self) -> None:
        """On a clean stop, drop this consumer from the group if it holds nothing pending."""
        try:
            pending = self.redis.xpending_range(
                self.config.stream, self.config.group, "-", "+", 1, consumername=self.name
            )
            if not pending:
                self.redis.xgroup_delconsumer(self.config.stream, self.config.group, self.name)
        except (redis.RedisError, OSError):
            log.debug("intake %s: could not leave the group", self.name, exc_info=True)


def install_signal_handlers(consumer: Consumer) -> None:
    """SIGTERM/SIGINT: finish the current message, then stop (main thread only)."""

    def handler(signum: int, _frame: Any) -> None:
        log.info("intake %s: signal %d, stopping", consumer.name, signum)
        consumer.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def connect(redis_url: str, config: IntakeConfig) -> redis.Redis:
    """A client of its own; the socket timeout outlasts the longest XREADGROUP block."""
    return redis.Redis.from_url(
        redis_url,
        decode_responses=True,
        socket_timeout=config.block_ms / 1000 + 10,
        health_check_interval=30,
    )


def consumer_from_settings(name: str | None = None, config: IntakeConfig | None = None) -> Consumer:
    """A consumer wired to this process's settings (TOLLGATE_DATABASE_URL, _REDIS_URL, ...)."""
    from orchestrator.db import get_engine
    from orchestrator.faults import set_process
    from orchestrator.scheduling.dispatch import Publisher as DispatchPublisher
    from orchestrator.settings import get_settings
    from orchestrator.storage import get_storage

    set_process("intake")
    config = config or IntakeConfig()
    redis_url = get_settings().redis_url
    if not redis_url:
        raise RuntimeError("TOLLGATE_REDIS_URL is not set; the intake reads a Redis stream")
    return Consumer(
        engine=get_engine(),
        storage=get_storage(),
        redis=connect(redis_url, config),
        publish=DispatchPublisher(redis_url),
        name=name or default_consumer_name(),
        config=config,
    )
