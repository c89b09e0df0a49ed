"""Transient faults of the backing services, classified in one place, and the retry helpers.

PostgreSQL: `billing.db.is_transient` (disconnects, refused connections, server shutdown);
`billing.db.run_transaction` retries them. Redis: connection errors, timeouts, a server
still loading its AOF, a read-only replica after a failover, and kombu's wrapper of them
(Celery's `send_task`). `retry_redis` retries those with the same bounded backoff.

Every retry is counted in `tollgate_transient_retries_total{process, dependency}`. The
process label is set once per process (`set_process`: api, intake, worker, beat) or for a
block (`process_scope`: beat tasks run inside a worker process).
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final, TypeVar

import redis
from kombu.exceptions import OperationalError as KombuOperationalError
from prometheus_client import Counter

from billing.db import add_retry_observer, is_transient, retry_delay_s

log = logging.getLogger(__name__)

T = TypeVar("T")

POSTGRESQL: Final = "postgresql"
REDIS: Final = "redis"
PROCESSES: Final = ("api", "intake", "worker", "beat", "cli")
# Redis calls on a request or publish path: retried for at most this long (seconds).
REDIS_RETRY_BUDGET_S: Final = 2.0
REDIS_ATTEMPTS_MAX: Final = 6
# The API: what a request may spend on retries before it answers 503 (seconds), and the
# Retry-After it then sends (seconds).
API_RETRY_BUDGET_S: Final = 2.0
API_RETRY_AFTER_S: Final = 2

REDIS_TRANSIENT_ERRORS: Final = (
    redis.ConnectionError,  # BusyLoadingError is one
    redis.TimeoutError,
    redis.ReadOnlyError,
    KombuOperationalError,
    ConnectionError,  # the OS's, under a client that does not wrap it
)

TRANSIENT_RETRIES = Counter(
    "tollgate_transient_retries",
    "Operations retried after a transient fault of a backing service",
    ["process", "dependency"],
)

_process = "cli"
_process_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tollgate_process", default=None
)


def set_process(name: str) -> None:
    """Name this process in the retry counter (api, intake, worker, beat)."""
    global _process
    assert name in PROCESSES, name
    _process = name


def current_process() -> str:
    return _process_override.get() or _process


@contextmanager
def process_scope(name: str) -> Iterator[None]:
    assert name in PROCESSES, name
    token = _process_override.set(name)
    try:
        yield
    finally:
        _process_override.reset(token)


def is_transient_redis(exc: BaseException) -> bool:
    return isinstance(exc, REDIS_TRANSIENT_ERRORS)


def dependency_of(exc: BaseException) -> str | None:
    """Which backing service a transient fault came from; None when it is not transient."""
    if is_transient(exc):
        return POSTGRESQL
    if is_transient_redis(exc):
        return REDIS
    return None


def count_retry(dependency: str) -> None:
    TRANSIENT_RETRIES.labels(current_process(), dependency).inc()


def _on_db_retry(exc: BaseException) -> None:
    log.info("database fault, retrying: %s", str(exc).splitlines()[0][:200])
    count_retry(POSTGRESQL)


add_retry_observer(_on_db_retry)


def retry_redis(
    fn: Callable[[], T],
    *,
    budget_s: float = REDIS_RETRY_BUDGET_S,
    attempts_max: int = REDIS_ATTEMPTS_MAX,
) -> T:
    """Call `fn`, retrying transient Redis faults with backoff: at most `attempts_max` calls
    and `budget_s` seconds. `fn` must be safe to repeat (an XADD or a task publish may then be
    sent twice: every consumer tolerates duplicates)."""
    started = time.monotonic()
    for attempt in range(1, attempts_max + 1):
        try:
            return fn()
        except REDIS_TRANSIENT_ERRORS:
            delay = retry_delay_s(attempt, transient=True)
            if attempt == attempts_max or time.monotonic() - started + delay > budget_s:
                raise
            count_retry(REDIS)
            time.sleep(delay)
    raise AssertionError("unreachable")
