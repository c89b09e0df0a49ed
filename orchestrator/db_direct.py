"""One-statement transactions on a plain psycopg connection, for a worker's per-job calls.

A worker's `begin` and `finish` are each ONE PL/pgSQL call that is a whole transaction
(migration 0011). Through SQLAlchemy each costs a pool checkout, its Connection and
transaction objects and, for `finish`, BEGIN and COMMIT round trips of their own: about
110-180 us of CPU per call against 76 us for the statement on a plain connection
(docs/benchmarks.md, "Session 9"). Here each thread of a process keeps one autocommit
psycopg connection (opened on first use, with the engine's own connect arguments), and a
statement is its own transaction: it commits when it returns, and waits for the WAL flush
unless the statement itself turns `synchronous_commit` off.

Errors come out as SQLAlchemy's DBAPIError kinds (`is_transient`, `is_conflict` and the
faults module classify them as for any transaction) and the call is retried like
`run_transaction` (billing.db.retried): a broken connection is closed and the next attempt
opens a new one. PostgreSQL only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Final

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from billing.db import PG_CONNECT_TIMEOUT_S, TRANSACTION_ATTEMPTS_MAX, retried

# Connections one process keeps (one per thread that calls `run_statement`); a thread
# beyond it is refused (a pool child has two: its task thread and its finisher).
CONNECTIONS_MAX: Final = 64


class _Connections(threading.local):
    def __init__(self) -> None:
        self.pid = 0
        self.by_engine: dict[str, psycopg.Connection[Any]] = {}


_local = _Connections()
# Called with each statement before it is sent (tests count round trips with it, as they do
# with SQLAlchemy's before_cursor_execute event).
_listeners: list[Callable[[str], None]] = []


def listen(fn: Callable[[str], None]) -> None:
    _listeners.append(fn)


def unlisten(fn: Callable[[str], None]) -> None:
    _listeners.remove(fn)


_open_lock = threading.Lock()
_open_count: dict[int, int] = {}  # pid -> connections opened and not closed


def run_statement(
    engine: Engine,
    sql: str,
    params: Callable[[], dict[str, Any]],
    *,
    attempts_max: int = TRANSACTION_ATTEMPTS_MAX,
    budget_s: float | None = None,
) -> Any:
    """Run one statement as a transaction of its own on this thread's connection for
    `engine`'s database; its first row (a named tuple) or None. `params()` gives the
    parameters of each attempt. Retried on conflicts and transient faults; the statement
    must be safe to rerun after a lost answer."""

    def once() -> Any:
        conn = _connection(engine)
        values = params()
        for listener in _listeners:
            listener(sql)
        try:
            return conn.execute(sql, values).fetchone()
        except psycopg.Error as exc:
            broken = conn.broken or conn.closed
            if broken:
                _drop(engine)
            raise DBAPIError.instance(
                sql, values, exc, psycopg.Error, connection_invalidated=broken
            ) from exc

    return retried(once, attempts_max=attempts_max, budget_s=budget_s)


def _connection(engine: Engine) -> psycopg.Connection[Any]:
    pid = os.getpid()
    if _local.pid != pid:  # a forked child never uses its parent's sockets
        _local.pid, _local.by_engine = pid, {}
    conn = _local.by_engine.get(_key(engine))
    if conn is not None and not conn.closed:
        return conn
    with _open_lock:
        if _open_count.get(pid, 0) >= CONNECTIONS_MAX:
            raise RuntimeError(f"more than {CONNECTIONS_MAX} direct connections in one process")
        _open_count[pid] = _open_count.get(pid, 0) + 1
    try:
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        kwargs.setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
        conn = psycopg.connect(*args, **kwargs, autocommit=True, row_factory=namedtuple_row)
    except psycopg.Error as exc:
        _forget_one(pid)
        raise DBAPIError.instance(
            "connect", None, exc, psycopg.Error, connection_invalidated=True
        ) from exc
    except BaseException:
        _forget_one(pid)
        raise
    _local.by_engine[_key(engine)] = conn
    return conn


def _key(engine: Engine) -> str:
    return str(engine.url)  # the same database whichever Engine object names it


def _drop(engine: Engine) -> None:
    conn = _local.by_engine.pop(_key(engine), None)
    if conn is not None:
        try:
            conn.close()
        finally:
            _forget_one(os.getpid())


def _forget_one(pid: int) -> None:
    with _open_lock:
        _open_count[pid] = max(0, _open_count.get(pid, 0) - 1)


def close_thread_connections() -> None:
    """Close this thread's connections (tests; a thread about to end)."""
    if _local.pid != os.getpid():
        return
    for key in list(_local.by_engine):
        conn = _local.by_engine.pop(key)
        try:
            conn.close()
        finally:
            _forget_one(os.getpid())
