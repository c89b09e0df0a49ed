"""The HTTP API against real PostgreSQL and Redis (no Celery worker: jobs stay queued or
dispatched unless a test drives them through orchestrator.execution itself)."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from billing.db import make_engine
from billing.tables import balances
from orchestrator import execution, jobs, states
from orchestrator.api import deps
from orchestrator.api.app import create_app
from orchestrator.images import IMAGE_BYTES_MAX
from orchestrator.settings import get_settings
from orchestrator.storage import Storage
from orchestrator.tables import jobs as jobs_table
from tests.api_helpers import api_server, image_bytes, png_bomb

ADMIN = {"Authorization": "Bearer test-admin-token"}
TXT2IMG: dict[str, Any] = {
    "type": "txt2img",
    "prompt": "a red bicycle",
    "width": 512,
    "height": 512,
    "steps": 20,
    "num_images": 1,
}

Headers = dict[str, str]


@pytest.fixture(scope="module")
def made_accounts() -> list[str]:
    return []


@pytest.fixture(scope="module")
def client(settings_env: None, pg_engine: Engine, made_accounts: list[str]) -> Iterator[TestClient]:
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


@contextmanager
def env_overridden(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


def make_account(
    http: TestClient, made: list[str], credits: int = 0, plan: str = "free"
) -> tuple[str, Headers]:
    res = http.post("/v1/accounts", json={"name": "api-test", "plan": plan}, headers=ADMIN)
    assert res.status_code == 201, res.text
    body = res.json()
    made.append(body["id"])
    if credits:
        grant = {"kind": "image", "amount": credits, "reference": f"g-{secrets.token_hex(8)}"}
        res = http.post(f"/v1/accounts/{body['id']}/grants", json=grant, headers=ADMIN)
        assert res.status_code == 201, res.text
    return body["id"], {"Authorization": f"Bearer {body['api_key']}"}


@pytest.fixture
def user(client: TestClient, made_accounts: list[str]) -> tuple[str, Headers]:
    return make_account(client, made_accounts, credits=20)


@pytest.fixture
def other(client: TestClient, made_accounts: list[str]) -> tuple[str, Headers]:
    return make_account(client, made_accounts, credits=5)


def image_balance(http: TestClient, headers: Headers) -> dict[str, int]:
    res = http.get("/v1/balance", headers=headers)
    assert res.status_code == 200, res.text
    found: dict[str, int] = res.json()["image"]
    return found


def submit(http: TestClient, headers: Headers, spec: dict[str, Any] | None = None) -> Any:
    return http.post("/v1/jobs", json={"spec": spec or TXT2IMG}, headers=headers)


# --- auth and admin ---------------------------------------------------------------------


def test_auth_is_required_and_checked(client: TestClient, user: tuple[str, Headers]) -> None:
    assert client.get("/v1/balance").status_code == 401
    bad = client.get("/v1/balance", headers={"Authorization": "Bearer tg_nope"})
    assert bad.status_code == 401 and "detail" in bad.json()
    assert client.post("/v1/quote", json=TXT2IMG).status_code == 401
    assert client.post("/v1/jobs", json=TXT2IMG).status_code == 401
    # A user's key is not the admin token.
    assert client.post("/v1/accounts", json={"name": "x"}, headers=user[1]).status_code == 401
    assert client.post("/v1/accounts", json={"name": "x"}).status_code == 401
    with env_overridden(TOLLGATE_ADMIN_TOKEN=""):
        res = client.post("/v1/accounts", json={"name": "x"}, headers=ADMIN)
        assert res.status_code == 403 and "disabled" in res.json()["detail"]


def test_admin_creates_accounts_and_grants_idempotently(
    client: TestClient, made_accounts: list[str]
) -> None:
    account_id, headers = make_account(client, made_accounts, plan="standard")
    assert image_balance(client, headers) == {"balance": 0, "held": 0, "available": 0}
    grant = {"kind": "image", "amount": 7, "source": "purchase", "reference": secrets.token_hex(8)}
    url = f"/v1/accounts/{account_id}/grants"
    first = client.post(url, json=grant, headers=ADMIN)
    assert first.status_code == 201 and first.json()["created"] is True
    again = client.post(url, json=grant, headers=ADMIN)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert image_balance(client, headers)["available"] == 7
    conflict = client.post(url, json={**grant, "amount": 8}, headers=ADMIN)
    assert conflict.status_code == 409
    unknown = client.post("/v1/accounts/acc_nobody/grants", json=grant, headers=ADMIN)
    assert unknown.status_code == 404
    bad_kind = client.post(url, json={**grant, "kind": "gold"}, headers=ADMIN)
    assert bad_kind.status_code == 422 and bad_kind.json()["field"] == "kind"
    bad_amount = client.post(url, json={**grant, "amount": "5"}, headers=ADMIN)
    assert bad_amount.status_code == 422 and bad_amount.json()["field"] == "amount"
    naive = client.post(url, json={**grant, "expires_at": "2099-01-01T00:00:00"}, headers=ADMIN)
    assert naive.status_code == 422 and naive.json()["field"] == "expires_at"
    bad_plan = client.post("/v1/accounts", json={"name": "x", "plan": "gold"}, headers=ADMIN)
    assert bad_plan.status_code == 422 and bad_plan.json()["field"] == "plan"


# --- quote and submit -------------------------------------------------------------------


def test_quote_prices_without_holding(client: TestClient, user: tuple[str, Headers]) -> None:
    res = client.post("/v1/quote", json={**TXT2IMG, "steps": 60, "num_images": 3}, headers=user[1])
    assert res.status_code == 200
    assert res.json()["credits"] == 6 and res.json()["credit_kind"] == "image"
    assert res.json()["breakdown"]["per_image"] == 2
    assert image_balance(client, user[1])["held"] == 0
    bad = client.post("/v1/quote", json={**TXT2IMG, "steps": 200}, headers=user[1])
    assert bad.status_code == 422 and bad.json()["field"] == "steps"
    assert "steps" in bad.json()["detail"]


def test_submit_holds_credits_and_returns_the_job(
    client: TestClient, user: tuple[str, Headers]
) -> None:
    res = submit(client, user[1], {**TXT2IMG, "num_images": 2})
    assert res.status_code == 202, res.text
    job = res.json()
    assert job["id"].startswith("job_") and job["type"] == "txt2img"
    assert job["status"] in (states.QUEUED, states.DISPATCHED)
    assert job["price"] == {"credits": 2, "credit_kind": "image"}
    assert job["charged"] == 0 and job["refunded"] == 0 and job["error"] is None
    assert job["progress"] == {"step": 0, "total": 0} and job["outputs"] == []
    assert job["created_at"] and job["finished_at"] is None
    assert image_balance(client, user[1]) == {"balance": 20, "held": 2, "available": 18}
    got = client.get(f"/v1/jobs/{job['id']}", headers=user[1])
    assert got.status_code == 200 and got.json()["status"] == states.DISPATCHED  # relayed
    bare = client.post("/v1/jobs", json=TXT2IMG, headers=user[1])  # a bare spec works too
    assert bare.status_code == 202
    listed = client.get("/v1/jobs", params={"status": "dispatched"}, headers=user[1]).json()
    assert [j["id"] for j in listed["jobs"]] == [bare.json()["id"], job["id"]]
    assert (
        client.get("/v1/jobs", params={"limit": 1}, headers=user[1]).json()["jobs"][0]["id"]
        == bare.json()["id"]
    )
    bad = client.get("/v1/jobs", params={"status": "nope"}, headers=user[1])
    assert bad.status_code == 422 and bad.json()["field"] == "status"


def test_idempotency_key(client: TestClient, user: tuple[str, Headers]) -> None:
    key = {"Idempotency-Key": secrets.token_hex(8), **user[1]}
    first = client.post("/v1/jobs", json={"spec": TXT2IMG}, headers=key)
    assert first.status_code == 202
    again = client.post("/v1/jobs", json={"spec": TXT2IMG}, headers=key)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    bare = client.post("/v1/jobs", json=TXT2IMG, headers=key)  # the same request, unwrapped
    assert bare.status_code == 200 and bare.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json={"spec": {**TXT2IMG, "prompt": "x"}}, headers=key)
    assert other.status_code == 409 and "detail" in other.json()
    assert image_balance(client, user[1])["held"] == 1


def test_insufficient_credits_is_402(client: TestClient, made_accounts: list[str]) -> None:
    _, headers = make_account(client, made_accounts, credits=1)
    res = submit(client, headers, {**TXT2IMG, "steps": 60})
    assert res.status_code == 402
    body = res.json()
    assert body["needed"] == 2 and body["available"] == 1 and body["credit_kind"] == "image"
    assert "insufficient" in body["detail"]
    rejected = client.get(f"/v1/jobs/{body['job_id']}", headers=headers).json()
    assert rejected["status"] == states.REJECTED
    cancel = client.post(f"/v1/jobs/{body['job_id']}/cancel", headers=headers)
    assert cancel.status_code == 409  # already ended
    assert image_balance(client, headers) == {"balance": 1, "held": 0, "available": 1}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"spec": {**TXT2IMG, "steps": 200}}, "steps"),
        ({"spec": {**TXT2IMG, "width": 333}}, "width"),
        ({"spec": {**TXT2IMG, "num_images": 9}}, "num_images"),
        ({"spec": {k: v for k, v in TXT2IMG.items() if k != "prompt"}}, "prompt"),
        ({"spec": {**TXT2IMG, "type": "paint"}}, "type"),
        ({"spec": TXT2IMG, "callback_url": "ftp://x"}, "callback_url"),
        ({"spec": {"type": "upscale", "scale": 4}}, "image_id"),
        ({"spec": {"type": "upscale", "image_id": "img_nope"}}, "image_id"),
        ({"spec": {"type": "upscale", "image_b64": "@@@"}}, "image_b64"),
        ({"spec": "txt2img"}, "spec"),
    ],
)
def test_bad_specs_are_422_naming_the_field(
    client: TestClient, user: tuple[str, Headers], body: dict[str, Any], field: str
) -> None:
    res = client.post("/v1/jobs", json=body, headers=user[1])
    assert res.status_code == 422, res.text
    assert res.json()["field"] == field and res.json()["detail"]
    assert image_balance(client, user[1])["held"] == 0


def test_non_json_body_is_422(client: TestClient, user: tuple[str, Headers]) -> None:
    res = client.post(
        "/v1/jobs", content=b"{nope", headers={**user[1], "Content-Type": "application/json"}
    )
    assert res.status_code == 422 and "detail" in res.json()


# --- other users, cancel, outputs -------------------------------------------------------


def test_another_users_job_is_not_found(
    client: TestClient, user: tuple[str, Headers], other: tuple[str, Headers]
) -> None:
    job_id = submit(client, user[1]).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=other[1]).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=other[1]).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/outputs/0", headers=other[1]).status_code == 404
    assert client.get("/v1/jobs", headers=other[1]).json()["jobs"] == []
    assert client.get(f"/v1/jobs/{job_id}", headers=user[1]).status_code == 200
    assert client.get("/v1/jobs/job_nope", headers=user[1]).status_code == 404


def test_cancel_queued_job_refunds_at_once(client: TestClient, user: tuple[str, Headers]) -> None:
    job = submit(client, user[1], {**TXT2IMG, "steps": 60}).json()
    assert image_balance(client, user[1])["held"] == 2
    res = client.post(f"/v1/jobs/{job['id']}/cancel", headers=user[1])
    assert res.status_code == 200
    canceled = res.json()
    assert canceled["status"] == states.CANCELED
    assert canceled["refunded"] == canceled["price"]["credits"] == 2 and canceled["charged"] == 0
    assert image_balance(client, user[1]) == {"balance": 20, "held": 0, "available": 20}
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=user[1])
    assert again.status_code == 200 and again.json()["status"] == states.CANCELED


def test_cancel_running_job_is_202_then_worker_stops(
    client: TestClient, user: tuple[str, Headers], pg_engine: Engine
) -> None:
    job_id = submit(client, user[1]).json()["id"]
    attempt = execution.begin(pg_engine, job_id, "api-test-worker")
    assert attempt is not None
    res = client.post(f"/v1/jobs/{job_id}/cancel", headers=user[1])
    assert res.status_code == 202 and res.json()["status"] == states.RUNNING
    assert execution.finish(pg_engine, attempt, states.CANCELED) == states.CANCELED
    ended = client.get(f"/v1/jobs/{job_id}", headers=user[1]).json()
    assert ended["refunded"] == 1 and ended["charged"] == 0
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=user[1]).status_code == 200


def test_outputs_are_served_when_delivered(
    client: TestClient,
    user: tuple[str, Headers],
    other: tuple[str, Headers],
    pg_engine: Engine,
    storage: Storage,
) -> None:
    job_id = submit(client, user[1], {**TXT2IMG, "num_images": 2}).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}/outputs/0", headers=user[1]).status_code == 404
    attempt = execution.begin(pg_engine, job_id, "api-test-worker")
    assert attempt is not None
    ctx = execution.RunContext(pg_engine, storage, attempt)
    png = image_bytes()
    ctx.deliver(0, png, {"seed": 7})
    ctx.not_delivered(1, "nsfw filter")
    assert execution.finish(pg_engine, attempt, states.SUCCEEDED, ctx=ctx) == states.SUCCEEDED
    job = client.get(f"/v1/jobs/{job_id}", headers=user[1]).json()
    assert job["outputs"] == [
        {"index": 0, "url": f"/v1/jobs/{job_id}/outputs/0", "seed": 7, "meta": {"seed": 7}}
    ]
    assert job["undelivered"] == [{"index": 1, "reason": "nsfw filter"}]
    assert job["charged"] == 1 and job["refunded"] == 1
    res = client.get(job["outputs"][0]["url"], headers=user[1])
    assert res.status_code == 200 and res.headers["content-type"] == "image/png"
    assert res.content == png
    assert client.get(f"/v1/jobs/{job_id}/outputs/1", headers=user[1]).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/outputs/0", headers=other[1]).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=user[1]).status_code == 409


# --- images -----------------------------------------------------------------------------


def upload(http: TestClient, headers: Headers, data: bytes, name: str = "in.png") -> Any:
    return http.post("/v1/images", files={"file": (name, data, "image/png")}, headers=headers)


def test_image_upload(
    client: TestClient, user: tuple[str, Headers], other: tuple[str, Headers]
) -> None:
    res = upload(client, user[1], image_bytes("PNG", (64, 48)))
    assert res.status_code == 201, res.text
    body = res.json()
    assert body["image_id"].startswith("img_")
    assert (body["width"], body["height"], body["format"]) == (64, 48, "PNG")
    raw = client.post(
        "/v1/images",
        content=image_bytes("JPEG"),
        headers={**user[1], "Content-Type": "image/jpeg"},
    )
    assert raw.status_code == 201 and raw.json()["format"] == "JPEG"
    webp = upload(client, user[1], image_bytes("WEBP"), "x.webp")
    assert webp.status_code == 201 and webp.json()["format"] == "WEBP"
    job = submit(client, user[1], {"type": "upscale", "image_id": body["image_id"], "scale": 2})
    assert job.status_code == 202 and job.json()["price"]["credits"] == 1
    theirs = submit(client, other[1], {"type": "upscale", "image_id": body["image_id"]})
    assert theirs.status_code == 422 and theirs.json()["field"] == "image_id"


def test_bad_images_are_refused(client: TestClient, user: tuple[str, Headers]) -> None:
    gif = upload(client, user[1], image_bytes("GIF"), "x.gif")
    assert gif.status_code == 422 and gif.json()["field"] == "file"
    assert "GIF" in gif.json()["detail"]
    junk = upload(client, user[1], b"not an image")
    assert junk.status_code == 422
    bomb = upload(client, user[1], png_bomb(30000))
    assert bomb.status_code == 422 and bomb.json()["field"] == "file"
    assert "30000" in bomb.json()["detail"] or "bomb" in bomb.json()["detail"]
    missing = client.post("/v1/images", files={"other": ("a", b"x")}, headers=user[1])
    assert missing.status_code == 422 and missing.json()["field"] == "file"
    text = client.post(
        "/v1/images", content=b"x", headers={**user[1], "Content-Type": "text/plain"}
    )
    assert text.status_code == 415


def test_too_big_image_is_413_without_reading_it_all(
    client: TestClient, user: tuple[str, Headers]
) -> None:
    big = b"\0" * (IMAGE_BYTES_MAX + 1)
    declared = client.post(
        "/v1/images", content=big, headers={**user[1], "Content-Type": "image/png"}
    )
    assert declared.status_code == 413
    assert upload(client, user[1], big).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the stream is cut off at the limit
        for _ in range(IMAGE_BYTES_MAX // 2**20 + 2):
            yield b"\0" * 2**20

    streamed = client.post(
        "/v1/images", content=chunks(), headers={**user[1], "Content-Type": "image/png"}
    )
    assert streamed.status_code == 413 and "detail" in streamed.json()


def test_inline_image_b64_for_an_upscale_job(
    client: TestClient, user: tuple[str, Headers], pg_engine: Engine
) -> None:
    data = base64.b64encode(image_bytes("PNG", (32, 32))).decode()
    res = submit(client, user[1], {"type": "upscale", "image_b64": data, "scale": 4})
    assert res.status_code == 202, res.text
    assert res.json()["price"] == {"credits": 2, "credit_kind": "image"}
    with pg_engine.connect() as conn:
        spec = conn.execute(
            select(jobs_table.c.spec).where(jobs_table.c.id == res.json()["id"])
        ).scalar_one()
    assert spec["image_id"].startswith("img_") and "image_b64" not in spec
    bomb = base64.b64encode(png_bomb(20000)).decode()
    refused = submit(client, user[1], {"type": "upscale", "image_b64": bomb})
    assert refused.status_code == 422 and refused.json()["field"] == "image_b64"


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
    assert set(seen[0]) == {"id", "kind", "type", "delta_balance", "delta_held", "created_at"}
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
