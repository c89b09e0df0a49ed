"""Fixtures of the HTTP API tests: one app per module and accounts made through the admin
routes; active jobs of those accounts are canceled at the end, so no credits stay held."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from orchestrator.api.app import create_app
from orchestrator.jobs import service as jobs
from orchestrator.jobs import states
from orchestrator.tables import jobs as jobs_table
from tests.api_helpers import Headers, make_account


@pytest.fixture(scope="module")
def made_accounts() -> list[str]:
    return []


@pytest.fixture(scope="module")
def client(
    settings_env: None, announced_slots: None, pg_engine: Engine, made_accounts: list[str]
) -> Iterator[TestClient]:
    with TestClient(create_app()) as test_client:
        yield test_client
    # Leave no job holding credits for the worker tests that may share this session.
    with pg_engine.connect() as conn:
        active = conn.execute(
            select(jobs_table.c.id).where(
                jobs_table.c.account_id.in_(made_accounts),
                jobs_table.c.status.in_(states.ACTIVE),
            )
        ).scalars()
        job_ids = list(active)
    for job_id in job_ids:
        jobs.cancel(pg_engine, None, job_id)


@pytest.fixture
def user(client: TestClient, made_accounts: list[str]) -> tuple[str, Headers]:
    return make_account(client, made_accounts, credits=20)


@pytest.fixture
def other(client: TestClient, made_accounts: list[str]) -> tuple[str, Headers]:
    return make_account(client, made_accounts, credits=5)
