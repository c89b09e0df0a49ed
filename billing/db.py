"""Engines and transactions. The service layer opens one transaction per operation with
`run_transaction()`; ledger functions take its Connection and never commit on their own.

Transient errors are classified here, in one place (`is_transient`): a lost or refused
connection, a server shutting down (SQLSTATE class 08, 57P01-57P03). `run_transaction`
reruns the whole transaction on them, and on conflicts (serialization failures, deadlocks,
unique violations, SQLite's lock timeout), with bounded exponential backoff and jitter: at
most `attempts_max` attempts AND at most `budget_s` seconds. A disconnect can happen after
COMMIT was sent and before its answer arrived (an ambiguous commit), so every transaction
body must recognise on rerun that it already applied (see docs/architecture.md,
"Transient faults").

PostgreSQL: READ COMMITTED plus row locks on the `balances` row of the (account, kind)
being changed. SQLite: every transaction starts with BEGIN IMMEDIATE, so writers are
serialised by the database lock (the pysqlite recipe from SQLAlchemy's docs).
"""

from __future__ import annotations

import contextvars
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_S = 30
TRANSACTION_ATTEMPTS_MAX = 8
RETRY_BACKOFF_BASE_S = 0.005
RETRY_BACKOFF_MAX_S = 0.2
# Transient faults (the server or the network): a longer backoff, and a total time budget
# per call (seconds), whatever the attempts left. Callers that must keep trying longer (a
# worker's finish) pass a bigger budget and more attempts; the API a smaller one.
TRANSIENT_BACKOFF_BASE_S = 0.05
TRANSIENT_BACKOFF_MAX_S = 1.0
TRANSIENT_RETRY_BUDGET_S = 10.0
# PostgreSQL SQLSTATEs that mean "run the transaction again".
RETRYABLE_PG_CODES = frozenset({"40001", "40P01"})
# admin_shutdown, crash_shutdown, cannot_connect_now (plus the whole class 08, connection).
SHUTDOWN_PG_CODES = frozenset({"57P01", "57P02", "57P03"})
# Driver messages of a lost connection that carry no SQLSTATE.
DISCONNECT_MESSAGES = (
    "server closed the connection",
    "connection is closed",
    "connection already closed",
    "consuming input failed",
    "connection refused",
    "could not connect",
    "terminating connection",
    "connection reset",
    "broken pipe",
    "ssl syscall",
    "the database system is",
)
PG_CONNECT_TIMEOUT_S = 5
# Pooled PostgreSQL connections older than this are replaced at checkout (seconds).
PG_POOL_RECYCLE_S = 1800


def make_engine(url: str, *, pool_size: int = 5, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url, echo=echo)
    # No pool_pre_ping: it costs a `SELECT 1` round trip on every checkout, i.e. on every
    # transaction, and a ledger hold or commit is itself only BEGIN + one statement + COMMIT
    # on PostgreSQL. pool_recycle instead retires connections before server or proxy idle
    # timeouts close them. What pre-ping would still catch (a server restart, a dropped
    # connection) now surfaces as a failed transaction instead: SQLAlchemy's optimistic
    # disconnect handling then invalidates the whole pool, so the other stale connections are
    # replaced at their next checkout rather than failing one by one.
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=PG_POOL_RECYCLE_S,
        # A host that does not answer at all fails the connect (a transient error) instead of
        # hanging past every retry budget.
        connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S},
        echo=echo,
    )


def _sqlite_engine(url: str, *, echo: bool) -> Engine:
    path = url.split("///", 1)[1] if "///" in url else ""
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, emit BEGIN; see "Serializable isolation / Savepoints".
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _sqlstate(exc: DBAPIError) -> str | None:
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return code if isinstance(code, str) else None


def is_transient(exc: BaseException) -> bool:
    """A lost, refused or shutting-down database connection: the same transaction can succeed
    on a new connection once the server answers again. (Not conflicts: see is_retryable.)"""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    code = _sqlstate(exc)
    if code is not None:
        return code.startswith("08") or code in SHUTDOWN_PG_CODES
    if not isinstance(exc, OperationalError | InterfaceError):
        return False
    if type(exc.orig).__module__.split(".")[0] in ("psycopg", "psycopg2"):
        return True  # a PostgreSQL driver's connection-level error without a SQLSTATE
    text = str(exc.orig).lower()
    return any(m in text for m in DISCONNECT_MESSAGES)


def is_conflict(exc: BaseException) -> bool:
    """Serialization failures, deadlocks and SQLite lock timeouts: the transaction can rerun.
    Unique violations too: the rerun sees the row that won the race."""
    if isinstance(exc, IntegrityError):
        return True
    if isinstance(exc, DBAPIError):
        if _sqlstate(exc) in RETRYABLE_PG_CODES:
            return True
        if isinstance(exc, OperationalError) and "locked" in str(exc.orig).lower():
            return True
    return False


def is_retryable(exc: BaseException) -> bool:
    """What run_transaction reruns: conflicts and transient faults."""
    return is_conflict(exc) or is_transient(exc)


# Called before each rerun after a transient fault (metrics: the orchestrator counts them).
RetryObserver = Callable[[BaseException], None]
_retry_observers: list[RetryObserver] = []
# The budget (seconds) of run_transaction calls in this context that pass none (the API sets
# a small one per request).
retry_budget_s: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "tollgate_retry_budget_s", default=None
)


def add_retry_observer(observer: RetryObserver) -> None:
    if observer not in _retry_observers:
        _retry_observers.append(observer)


@contextmanager
def transient_budget(budget_s: float) -> Iterator[None]:
    """Let run_transaction calls in this block spend at most `budget_s` on transient faults."""
    token = retry_budget_s.set(budget_s)
    try:
        yield
    finally:
        retry_budget_s.reset(token)


def retry_delay_s(attempt: int, *, transient: bool) -> float:
    """Exponential backoff with full jitter for the attempt that just failed (1-based)."""
    if transient:
        cap = min(TRANSIENT_BACKOFF_MAX_S, TRANSIENT_BACKOFF_BASE_S * 2 ** (attempt - 1))
        return random.uniform(cap / 2, cap)
    return random.uniform(0, min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_BASE_S * 2**attempt))


def run_transaction(
    engine: Engine,
    fn: Callable[[Connection], T],
    *,
    attempts_max: int = TRANSACTION_ATTEMPTS_MAX,
    budget_s: float | None = None,
) -> T:
    """Run `fn` in one transaction, rerunning it on conflicts and transient faults: at most
    `attempts_max` attempts, and transient faults only while `budget_s` seconds have not
    passed (default: the context's `transient_budget`, else TRANSIENT_RETRY_BUDGET_S).
    `fn` must not commit and must be safe to rerun from the start (it sees a fresh
    transaction each time), including after a commit that went through but whose answer
    was lost: it must then find its own effects."""

    def once() -> T:
        with engine.begin() as conn:
            return fn(conn)

    return retried(once, attempts_max=attempts_max, budget_s=budget_s)


def retried(
    call: Callable[[], T],
    *,
    attempts_max: int = TRANSACTION_ATTEMPTS_MAX,
    budget_s: float | None = None,
) -> T:
    """`call()` (one whole transaction), rerun on conflicts and transient faults as
    `run_transaction` describes; `call` raises SQLAlchemy's DBAPIError kinds."""
    if budget_s is None:
        budget_s = retry_budget_s.get()
    if budget_s is None:
        budget_s = TRANSIENT_RETRY_BUDGET_S
    started = time.monotonic()
    for attempt in range(1, attempts_max + 1):
        try:
            return call()
        except DBAPIError as exc:
            transient = is_transient(exc)
            if attempt == attempts_max or not (transient or is_conflict(exc)):
                raise
            delay = retry_delay_s(attempt, transient=transient)
            if transient:
                if time.monotonic() - started + delay > budget_s:
                    raise
                for observer in _retry_observers:
                    observer(exc)
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction without retries, for callers that handle errors themselves."""
    with engine.begin() as conn:
        yield conn
