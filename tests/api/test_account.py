"""The HTTP API's balance, ledger, health and metrics routes, and concurrent submissions
against a real server."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from billing.db import make_engine
from billing.tables import balances
from orchestrator.api import deps
from orchestrator.api.app import create_app
from tests.api_helpers import (
    TXT2IMG,
    Headers,
    api_server,
    env_overridden,
    make_account,
    submit,
)

# --- balance, ledger, health, metrics ---------------------------------------------------


def test_balance_and_ledger_pages(client: TestClient, made_accounts: list[str]) -> None:
    _, headers = make_account(client, made_accounts, credits=10)
    for _ in range(3):
        assert submit(client, headers).status_code == 202
    balances = client.get("/v1/balance", headers=headers).json()
    assert set(balances) == {"image", "tune", "tune_image"}
    assert balances["image"] == {"balance": 10, "held": 3, "available": 7}
    assert balances["tune"] == {"balance": 0, "held": 0, "available": 0}
    seen: list[dict[str, Any]] = []
    before: int | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"before": before} if before else {})}
        page = client.get("/v1/ledger", params=params, headers=headers).json()
        seen += page["entries"]
        before = page["next_before"]
        if before is None:
            break
        assert len(page["entries"]) == 2
    assert [e["type"] for e in seen] == ["hold", "hold", "hold", "grant"]
    ids = [e["id"] for e in seen]
    assert ids == sorted(ids, reverse=True)
    assert seen[-1]["delta_balance"] == 10 and seen[0]["delta_held"] == 1
    assert set(seen[0]) == {
        "id",
        "kind",
        "type",
        "delta_balance",
        "delta_held",
        "created_at",
        "reference",
        "source",
        "job_id",
    }
    bad = client.get("/v1/ledger", params={"limit": 0}, headers=headers)
    assert bad.status_code == 422 and bad.json()["field"] == "limit"


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    app = create_app()
    dead = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    app.dependency_overrides[deps.get_engine] = lambda: dead
    try:
        with TestClient(app) as down:
            res = down.get("/healthz")
        assert res.status_code == 503 and res.json()["status"] == "unavailable"
    finally:
        dead.dispose()


def test_metrics(client: TestClient, user: tuple[str, Headers]) -> None:
    assert submit(client, user[1]).status_code == 202
    text = client.get("/metrics").text
    assert 'tollgate_jobs{status="dispatched",type="txt2img"}' in text
    assert 'tollgate_queue_depth{queue="gpu.txt2img"}' in text
    assert 'tollgate_queue_depth{queue="tollgate:jobs"} 0.0' in text
    assert 'tollgate_queue_depth{queue="tollgate.callbacks"}' in text
    assert 'tollgate_credits_held{kind="image"}' in text
    assert 'tollgate_credits_committed_total{kind="image"}' in text
    assert 'tollgate_up{component="redis"} 1.0' in text
    assert 'tollgate_http_requests_total{method="POST",route="/v1/jobs",status="202"}' in text
    assert "tollgate_http_request_duration_seconds_bucket" in text
    with env_overridden(TOLLGATE_REDIS_URL="redis://127.0.0.1:1/0"):
        down = client.get("/metrics")
    assert down.status_code == 200
    assert 'tollgate_up{component="redis"} 0.0' in down.text and "tollgate_jobs{" in down.text


def test_openapi_docs(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/quote", "/v1/images", "/v1/balance", "/v1/ledger"} <= set(paths)


# --- concurrency against a real server --------------------------------------------------

CONCURRENT_REQUESTS = 200
CONCURRENT_CREDITS = 100


def _watch_balance(engine: Engine, account_id: str, stop: threading.Event) -> list[int]:
    """Sample the account's cached image balance (balance - held) until stopped."""
    seen: list[int] = []
    stmt = select(balances.c.balance - balances.c.held).where(
        balances.c.account_id == account_id, balances.c.kind == "image"
    )
    while not stop.is_set():
        with engine.connect() as conn:
            seen.append(int(conn.execute(stmt).scalar_one()))
        time.sleep(0.005)
    return seen


async def _burst(base: str, headers: Headers) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=CONCURRENT_REQUESTS)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:

        async def one(i: int) -> httpx.Response:
            spec = {**TXT2IMG, "prompt": f"burst {i}"}
            return await http.post("/v1/jobs", json={"spec": spec}, headers=headers)

        return list(await asyncio.gather(*(one(i) for i in range(CONCURRENT_REQUESTS))))


@pytest.mark.slow
def test_concurrent_submits_never_overdraw(
    client: TestClient,
    made_accounts: list[str],
    service_env: dict[str, str],
    pg_engine: Engine,
    tmp_path: Path,
) -> None:
    account_id, headers = make_account(client, made_accounts, credits=CONCURRENT_CREDITS)
    stop = threading.Event()
    with (
        api_server(service_env, tmp_path / "api.log") as base,
        ThreadPoolExecutor(1) as pool,
    ):
        watcher = pool.submit(_watch_balance, pg_engine, account_id, stop)
        try:
            responses = asyncio.run(_burst(base, headers))
        finally:
            stop.set()
        final = httpx.get(f"{base}/v1/balance", headers=headers).json()["image"]
    codes = [r.status_code for r in responses]
    assert codes.count(202) == CONCURRENT_CREDITS, sorted(set(codes))
    assert codes.count(402) == CONCURRENT_REQUESTS - CONCURRENT_CREDITS
    assert len({r.json()["id"] for r in responses if r.status_code == 202}) == CONCURRENT_CREDITS
    assert all(r.json()["needed"] == 1 for r in responses if r.status_code == 402)
    samples = watcher.result()
    assert len(samples) > 10 and min(samples) >= 0
    assert final == {"balance": CONCURRENT_CREDITS, "held": CONCURRENT_CREDITS, "available": 0}


def test_oversized_json_body_is_refused_with_413(settings_env: None) -> None:
    from fastapi.testclient import TestClient

    from orchestrator.api.app import create_app
    from orchestrator.api.limits import BODY_BYTES_MAX

    with TestClient(create_app()) as client:
        r = client.post(
            "/v1/jobs",
            content=b"x" * (BODY_BYTES_MAX + 1),
            headers={"Content-Type": "application/json"},
        )
    assert r.status_code == 413
    assert "request body over" in r.json()["detail"]
