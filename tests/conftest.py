"""Shared fixtures: a fresh PostgreSQL database per test session (real server), SQLite
files where a test is about the embedded default, and a private Redis database number."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from billing.db import make_engine, run_transaction
from billing.verify import verify
from orchestrator.db import upgrade

PG_ADMIN_URL = os.environ.get(
    "TOLLGATE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _pg_url_for(name: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A new PostgreSQL database, migrated to head; its ledger must verify clean at the end."""
    name = f"tollgate_test_{os.getpid()}_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = _pg_url_for(name)
    upgrade(url)
    yield url
    engine = make_engine(url)
    problems = run_transaction(engine, verify)
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
    assert problems == [], f"ledger verify after the suite's workloads: {problems}"


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url, pool_size=10)
    yield engine
    engine.dispose()


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def sqlite_db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = sqlite_url(tmp_path_factory.mktemp("sqlite") / "tollgate.db")
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def sqlite_engine(sqlite_db_url: str) -> Iterator[Engine]:
    engine = make_engine(sqlite_db_url)
    yield engine
    assert run_transaction(engine, verify) == []
    engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def any_engine(request: pytest.FixtureRequest) -> Engine:
    """The ledger's behaviour on both backends it supports."""
    name = "pg_engine" if request.param == "postgresql" else "sqlite_engine"
    engine: Engine = request.getfixturevalue(name)
    return engine
