"""One-statement transactions on plain psycopg connections, for the per-job hot calls.

A worker's `begin` and `finish`, and the API's usual submit, are each ONE statement that is
a whole transaction (PL/pgSQL calls, migrations 0003 and 0011). Through SQLAlchemy each
costs a pool checkout, its Connection and transaction objects and, for a durable write,
BEGIN and COMMIT round trips of their own: 110-180 us of CPU per call against 76 us for the
statement on a plain connection (docs/benchmarks.md, "Session 9"). Here a process keeps a
small pool of autocommit psycopg connections per database (opened on first use with the
engine's own connect arguments, at most POOL_SIZE, each replaced after PG_POOL_RECYCLE_S
as the engine's are), and a statement is its own transaction:
it commits when it returns, and waits for the WAL flush unless the statement itself turns
`synchronous_commit` off.

Errors come out as SQLAlchemy's DBAPIError kinds (`is_transient`, `is_conflict` and the
faults module classify them as for any transaction) and the call is retried like
`run_transaction` (billing.db.retried): a broken connection is closed and the next attempt
takes another or opens a new one. A forked child never uses (or closes) its parent's
connections. PostgreSQL only.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from billing.db import (
    PG_CONNECT_TIMEOUT_S,
    PG_POOL_RECYCLE_S,
    TRANSACTION_ATTEMPTS_MAX,
    retried,
)

POOL_SIZE: Final = 8  # connections one process keeps per database
CHECKOUT_TIMEOUT_S: Final = 30.0  # waiting for a free one (all POOL_SIZE busy)

# Called with each statement before it is sent (tests count round trips with it, as they do
# with SQLAlchemy's before_cursor_execute event).
_listeners: list[Callable[[str], None]] = []


def listen(fn: Callable[[str], None]) -> None:
    _listeners.append(fn)


def unlisten(fn: Callable[[str], None]) -> None:
    _listeners.remove(fn)


class _Pool:
    """At most POOL_SIZE connections to one database, the idle ones reused last-in first."""

    def __init__(self, engine: Engine) -> None:
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        kwargs.setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
        self._args, self._kwargs = args, kwargs
        # (connection, when it was opened: time.monotonic()), the last returned last
        self._idle: list[tuple[psycopg.Connection[Any], float]] = []
        self._slots = threading.BoundedSemaphore(POOL_SIZE)
        self._lock = threading.Lock()

    def checkout(self) -> tuple[psycopg.Connection[Any], float]:
        """A connection and when it was opened (time.monotonic()), for `checkin`."""
        if not self._slots.acquire(timeout=CHECKOUT_TIMEOUT_S):
            raise PoolTimeout(f"no direct connection free in {CHECKOUT_TIMEOUT_S:g} s")
        with self._lock:
            idle = self._idle.pop() if self._idle else None
        if idle is not None:
            conn, opened_at = idle
            if not conn.closed and time.monotonic() - opened_at < PG_POOL_RECYCLE_S:
                return conn, opened_at
            conn.close()  # replaced before a server or proxy idle timeout closes it
        try:
            conn = psycopg.connect(
                *self._args, **self._kwargs, autocommit=True, row_factory=namedtuple_row
            )
            return conn, time.monotonic()
        except psycopg.Error as exc:
            self._slots.release()
            raise DBAPIError.instance(
                "connect", None, exc, psycopg.Error, connection_invalidated=True
            ) from exc
        except BaseException:
            self._slots.release()
            raise

    def checkin(self, conn: psycopg.Connection[Any], opened_at: float, *, broken: bool) -> None:
        try:
            if broken:
                conn.close()
            else:
                with self._lock:
                    self._idle.append((conn, opened_at))
        finally:
            self._slots.release()

    def close_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()


_pools: dict[str, _Pool] = {}
_pools_pid = 0
_pools_lock = threading.Lock()
# A forked child's copies of its parent's pools: kept referenced and never used, so that
# no garbage collection closes (and so ends on the server) a connection the parent uses.
_inherited: list[dict[str, _Pool]] = []


def _pool(engine: Engine) -> _Pool:
    global _pools, _pools_pid
    key = str(engine.url)  # the same database whichever Engine object names it
    with _pools_lock:
        if _pools_pid != os.getpid():
            if _pools:
                _inherited.append(_pools)
            _pools, _pools_pid = {}, os.getpid()
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = _Pool(engine)
        return pool


def run_statement(
    engine: Engine,
    sql: str,
    params: Callable[[], dict[str, Any]],
    *,
    attempts_max: int = TRANSACTION_ATTEMPTS_MAX,
    budget_s: float | None = None,
) -> Any:
    """Run one statement as a transaction of its own on a direct connection to `engine`'s
    database; its first row (a named tuple) or None. `params()` gives the parameters of
    each attempt. Retried on conflicts and transient faults; the statement must be safe to
    rerun after a lost answer."""
    pool = _pool(engine)

    def once() -> Any:
        conn, opened_at = pool.checkout()
        broken = True
        try:
            values = params()
            for listener in _listeners:
                listener(sql)
            try:
                row = conn.execute(sql, values).fetchone()
            except psycopg.Error as exc:
                broken = conn.broken or conn.closed
                raise DBAPIError.instance(
                    sql, values, exc, psycopg.Error, connection_invalidated=broken
                ) from exc
            broken = False
            return row
        finally:
            pool.checkin(conn, opened_at, broken=broken)

    return retried(once, attempts_max=attempts_max, budget_s=budget_s)


def close_idle() -> None:
    """Close this process's idle direct connections (tests; a process about to exit)."""
    with _pools_lock:
        pools = list(_pools.values()) if _pools_pid == os.getpid() else []
    for pool in pools:
        pool.close_idle()
