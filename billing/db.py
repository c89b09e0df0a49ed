"""Engines and transactions. The service layer opens one transaction per operation with
`transaction()`; ledger functions take its Connection and never commit on their own.

PostgreSQL: READ COMMITTED plus row locks on the `balances` row of the (account, kind)
being changed. SQLite: every transaction starts with BEGIN IMMEDIATE, so writers are
serialised by the database lock (the pysqlite recipe from SQLAlchemy's docs).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_S = 30
TRANSACTION_ATTEMPTS_MAX = 8
RETRY_BACKOFF_BASE_S = 0.005
RETRY_BACKOFF_MAX_S = 0.2
# PostgreSQL SQLSTATEs that mean "run the transaction again".
RETRYABLE_PG_CODES = frozenset({"40001", "40P01"})
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


def is_retryable(exc: BaseException) -> bool:
    """Serialization failures, deadlocks and SQLite lock timeouts: the transaction can rerun.
    Unique violations are retryable too: the rerun sees the row that won the race."""
    if isinstance(exc, IntegrityError):
        return True
    if isinstance(exc, DBAPIError):
        code = getattr(exc.orig, "sqlstate", None)
        if code in RETRYABLE_PG_CODES:
            return True
        if isinstance(exc, OperationalError) and "locked" in str(exc.orig).lower():
            return True
    return False


def run_transaction(
    engine: Engine, fn: Callable[[Connection], T], *, attempts_max: int = TRANSACTION_ATTEMPTS_MAX
) -> T:
    """Run `fn` in one transaction, rerunning it on retryable errors. `fn` must not commit
    and must be safe to rerun from the start (it sees a fresh transaction each time)."""
    for attempt in range(1, attempts_max + 1):
        try:
            with engine.begin() as conn:
                return fn(conn)
        except DBAPIError as exc:
            if attempt == attempts_max or not is_retryable(exc):
                raise
            delay = min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_BASE_S * 2**attempt)
            time.sleep(random.uniform(0, delay))
    raise AssertionError("unreachable")


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction without retries, for callers that handle errors themselves."""
    with engine.begin() as conn:
        yield conn
