"""Shared fixtures: a fresh PostgreSQL database per test session (real server), SQLite
files where a test is about the embedded default, and a private Redis database number."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


# A fixed Standard Webhooks secret for the test session's processes (tests verify with it).
TEST_WEBHOOK_SECRET = "whsec_8S/6Fc39ylIzSAv085SSejSpgmKZEeOB20ujjSSatrE="

REDIS_BASE_URL = os.environ.get("TOLLGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB_COUNT = 16
REDIS_LOCK_KEY = "tollgate:test-session-lock"
REDIS_LOCK_TTL_S = 3600


@contextmanager
def _own_redis_db() -> Iterator[str]:
    """The URL of a Redis database number no other holder has taken (a lock key in it),
    flushed before and after."""
    import redis

    for db in range(1, REDIS_DB_COUNT):
        client = redis.Redis.from_url(f"{REDIS_BASE_URL}/{db}")
        if client.set(REDIS_LOCK_KEY, os.getpid(), nx=True, ex=REDIS_LOCK_TTL_S):
            client.flushdb()
            client.set(REDIS_LOCK_KEY, os.getpid(), ex=REDIS_LOCK_TTL_S)
            try:
                yield f"{REDIS_BASE_URL}/{db}"
            finally:
                client.flushdb()
                client.close()
            return
        client.close()
    raise RuntimeError("no free Redis database")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database number no other concurrent test session holds, flushed for us."""
    with _own_redis_db() as url:
        yield url


@pytest.fixture
def private_redis() -> Iterator[Any]:
    """A client on a Redis database of this test's own (taken like `redis_url`'s): slots a
    worker of an earlier test announced in the session's database (they live up to
    `worker_slots_ttl_s` after a killed worker) are not seen there."""
    import redis

    with _own_redis_db() as url:
        client = redis.Redis.from_url(url, decode_responses=True)
        yield client
        client.close()


@pytest.fixture(scope="session")
def storage_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("storage"))


@pytest.fixture(scope="session")
def storage(storage_url: str):  # type: ignore[no-untyped-def]
    from orchestrator.storage import Storage

    return Storage(storage_url)


@pytest.fixture(scope="session")
def service_env(pg_url: str, redis_url: str, storage_url: str) -> dict[str, str]:
    """Environment for child processes (workers, API, intake) of this test session."""
    return {
        **os.environ,
        "TOLLGATE_DATABASE_URL": pg_url,
        "TOLLGATE_REDIS_URL": redis_url,
        "TOLLGATE_STORAGE_URL": storage_url,
        "TOLLGATE_ADMIN_TOKEN": "test-admin-token",
        "TOLLGATE_CALLBACK_SECRET": TEST_WEBHOOK_SECRET,
        "TOLLGATE_OUTPUT_URL_SECRET": "test-output-url-secret-" + "0" * 16,
        "TOLLGATE_CALLBACK_BACKOFF_S": "0.2",
    }


@pytest.fixture(scope="session")
def settings_env(service_env: dict[str, str]) -> Iterator[None]:
    """Point this process's settings at the session's services too."""
    from orchestrator.settings import get_settings

    saved = dict(os.environ)
    os.environ.update(service_env)
    get_settings.cache_clear()
    yield
    os.environ.clear()
    os.environ.update(saved)
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def models_kit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model kit, built once per session (TOLLGATE_TEST_TINY_DIR reuses a kit
    between runs: make_tiny is idempotent)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from models.tiny import make_tiny

    env = os.environ.get("TOLLGATE_TEST_TINY_DIR")
    folder = Path(env) if env else tmp_path_factory.mktemp("tiny-kit")
    make_tiny(folder)
    return folder


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """moto's S3 server as a real child process, with a bucket; the AWS_* variables that
    reach it, and TOLLGATE_STORAGE_URL=s3://<bucket>/<prefix>."""
    from tests.support.s3 import moto_s3

    with moto_s3(tmp_path_factory.mktemp("moto")) as env:
        bucket = env["TOLLGATE_TEST_S3_BUCKET"]
        yield {**env, "TOLLGATE_STORAGE_URL": f"s3://{bucket}/tollgate"}


@pytest.fixture(scope="session")
def s3rver_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """s3rver (tests/s3rver/, Node.js) as a child process, with a bucket: the S3 server that
    enforces presigned URLs' expiry and SigV4 signatures. The same variables as s3_env."""
    from tests.support.s3 import s3rver

    with s3rver(tmp_path_factory.mktemp("s3rver")) as env:
        bucket = env["TOLLGATE_TEST_S3_BUCKET"]
        yield {**env, "TOLLGATE_STORAGE_URL": f"s3://{bucket}/tollgate"}


ANNOUNCED_SLOTS = 1000


@pytest.fixture(scope="module")
def announced_slots(redis_url: str) -> Iterator[None]:
    """For tests of the ways in that run no worker: slots announced on every GPU queue the
    way a worker announces them (orchestrator.slots), so the dispatcher sends what they
    submit (its tasks wait in the Celery queue, as with a busy worker). Withdrawn after."""
    import redis

    from orchestrator.jobs.families import GPU_QUEUES
    from orchestrator.scheduling.slots import WorkerSlots, announce, withdraw

    client = redis.Redis.from_url(redis_url)
    worker = WorkerSlots(f"announced-{secrets.token_hex(3)}", GPU_QUEUES, ANNOUNCED_SLOTS)
    announce(client, worker, ttl_s=REDIS_LOCK_TTL_S)
    yield
    withdraw(client, worker)
    client.close()
