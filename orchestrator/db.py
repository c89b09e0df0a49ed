"""The process's engine and schema migrations (Alembic)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine

from billing.db import make_engine
from orchestrator import faults  # noqa: F401  (counts the engine's transient retries)
from orchestrator.settings import get_settings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


@lru_cache(maxsize=4)
def engine_for(url: str) -> Engine:
    return make_engine(url)


def get_engine() -> Engine:
    return engine_for(get_settings().database_url)


@lru_cache(maxsize=8)
def single_statements(engine: Engine) -> Engine:
    """`engine` with each statement its own transaction (autocommit): a transaction of ONE
    statement then costs one round trip, not BEGIN, the statement and COMMIT. Only for
    statements that are atomic on their own (one PL/pgSQL call)."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url or get_settings().database_url), revision)


def commit_without_flush_wait(conn: Connection) -> None:
    """Let this transaction's COMMIT return before its WAL reaches disk (PostgreSQL's
    `synchronous_commit = off`, for this transaction only). A server crash may then lose the
    last ~0.6 s of such commits, but never reorders them: a later synchronous commit flushes
    every earlier one with it, so nothing that depends on them can survive without them.

    Only for writes that are safe to lose: a lease taken (the job is redelivered or reaped),
    throttled progress, an outbox row marked published (it is sent again). Never for a
    transaction that moves money or ends a job. A no-op on SQLite."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
