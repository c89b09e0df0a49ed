"""The API while PostgreSQL or Redis is unreachable (a TCP proxy cut in front of the real
server): 503 with Retry-After and the dependency named, never a 500, and the first request
after the service is back succeeds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from orchestrator.api.app import create_app
from orchestrator.faults import API_RETRY_BUDGET_S
from orchestrator.jobs import service as jobs
from orchestrator.jobs import states
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.scheduling.outbox import relay
from orchestrator.scheduling.scheduler import nudge
from tests.api_helpers import env_overridden, make_account, submit
from tests.lifecycle_helpers import row
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture(scope="module")
def proxies(pg_url: str, redis_url: str) -> Iterator[tuple[TcpProxy, TcpProxy]]:
    pg = TcpProxy(make_url(pg_url).port or 5432)
    rd = TcpProxy(int(redis_url.split(":")[2].split("/")[0]))
    yield pg, rd
    pg.close()
    rd.close()


@pytest.fixture(scope="module")
def http(
    settings_env: None, pg_url: str, redis_url: str, proxies: tuple[TcpProxy, TcpProxy]
) -> Iterator[TestClient]:
    pg, rd = proxies
    db_url = make_url(pg_url).set(port=pg.port).render_as_string(hide_password=False)
    redis_db = redis_url.rsplit("/", 1)[1]
    with (
        env_overridden(
            TOLLGATE_DATABASE_URL=db_url,
            TOLLGATE_REDIS_URL=f"redis://127.0.0.1:{rd.port}/{redis_db}",
        ),
        TestClient(create_app()) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def user(http: TestClient) -> Iterator[tuple[str, dict[str, str]]]:
    made: list[str] = []
    yield make_account(http, made, credits=10)


def assert_unavailable(res: Any, dependency: str) -> None:
    assert res.status_code == 503, res.text
    assert int(res.headers["Retry-After"]) >= 1
    assert res.json()["dependency"] == dependency


def test_database_outage_answers_503_then_recovers(
    http: TestClient,
    user: tuple[str, dict[str, str]],
    proxies: tuple[TcpProxy, TcpProxy],
    pg_engine: Engine,
) -> None:
    pg, _ = proxies
    account, headers = user
    job = submit(http, headers).json()
    pg.cut()
    try:
        started = time.monotonic()
        assert_unavailable(http.get(f"/v1/jobs/{job['id']}", headers=headers), "postgresql")
        assert time.monotonic() - started < API_RETRY_BUDGET_S + 3
        assert_unavailable(http.post(f"/v1/jobs/{job['id']}/cancel", headers=headers), "postgresql")
        assert_unavailable(submit(http, headers), "postgresql")
        assert_unavailable(http.get("/v1/balance", headers=headers), "postgresql")
        health = http.get("/healthz")
        assert health.status_code == 503 and "Retry-After" in health.headers
    finally:
        pg.restore()
    # The first request after recovery succeeds (the pool was invalidated).
    res = http.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert res.status_code == 200, res.text
    assert res.json()["status"] == states.CANCELED
    metrics = http.get("/metrics").text
    assert 'tollgate_transient_retries_total{dependency="postgresql",process="api"}' in metrics


def test_a_database_blip_inside_the_budget_is_invisible(
    http: TestClient, user: tuple[str, dict[str, str]], proxies: tuple[TcpProxy, TcpProxy]
) -> None:
    pg, _ = proxies
    _, headers = user
    pg.cut()  # every pooled connection is closed; the server is back 0.3 s later
    import threading

    threading.Timer(0.3, pg.restore).start()
    assert http.get("/v1/balance", headers=headers).status_code == 200


def test_redis_outage_never_500s_and_the_republisher_catches_up(
    http: TestClient,
    user: tuple[str, dict[str, str]],
    proxies: tuple[TcpProxy, TcpProxy],
    pg_engine: Engine,
    redis_url: str,
    announced_slots: None,
) -> None:
    _, rd = proxies
    account, headers = user
    rd.cut()
    try:
        started = time.monotonic()
        res = submit(http, headers)  # the job is recorded and waits in the scheduler's line
        assert res.status_code == 202, res.text
        assert time.monotonic() - started < 10
    finally:
        rd.restore()
    job_id = res.json()["id"]
    assert row(pg_engine, job_id).status == states.QUEUED
    # What beat's periodic dispatcher and re-publisher do once Redis is back.
    nudge(pg_engine, Publisher(redis_url), job_id)
    relay(pg_engine, Publisher(redis_url), job_id=job_id)
    assert row(pg_engine, job_id).status == states.DISPATCHED
    jobs.cancel(pg_engine, account, job_id)


def test_openapi_documents_the_503(http: TestClient) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    for path, method in (
        ("/v1/jobs", "post"),
        ("/v1/jobs/{job_id}/cancel", "post"),
        ("/v1/balance", "get"),
    ):
        response = paths[path][method]["responses"]["503"]
        assert "Retry-After" in response["headers"]
