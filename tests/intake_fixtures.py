"""Fixtures of the intake tests (tests/test_intake*.py import them with `*`): a Redis
client, private streams, a stepped consumer and a funded account."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import Engine

from orchestrator.ingress.intake import Consumer
from orchestrator.ingress.streams import IntakeConfig
from orchestrator.storage import Storage
from tests.intake_helpers import make_consumer, private_config
from tests.ledger_helpers import grant, new_account

__all__ = ["account", "config", "consumer", "rc"]


@pytest.fixture
def rc(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def config() -> IntakeConfig:
    return private_config()


@pytest.fixture
def consumer(pg_engine: Engine, storage: Storage, redis_url: str, config: IntakeConfig) -> Consumer:
    return make_consumer(pg_engine, storage, redis_url, config)


@pytest.fixture
def account(pg_engine: Engine) -> str:
    account_id = new_account(pg_engine)
    grant(pg_engine, account_id, 10)
    return account_id
