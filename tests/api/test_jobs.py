"""The HTTP API's auth, admin, quote, submit, cancel and outputs routes against real
PostgreSQL and Redis (no Celery worker: jobs stay queued or dispatched unless a test drives
them through orchestrator.execution.protocol itself)."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.execution import protocol as execution
from orchestrator.jobs import states
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.scheduling.nudger import Nudger
from orchestrator.scheduling.outbox import relay
from orchestrator.scheduling.scheduler import nudge
from orchestrator.storage import Storage
from orchestrator.tables import jobs as jobs_table
from orchestrator.tables import outbox
from tests.api_helpers import (
    ADMIN,
    TXT2IMG,
    Headers,
    env_overridden,
    image_balance,
    image_bytes,
    make_account,
    settle,
    submit,
)

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
    settle(client)  # its dispatch and relay run on the nudger thread
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
    [out] = job["outputs"]
    assert {k: out[k] for k in ("index", "api_url", "seed", "meta", "deleted")} == {
        "index": 0,
        "api_url": f"/v1/jobs/{job_id}/outputs/0",
        "seed": 7,
        "meta": {"seed": 7},
        "deleted": False,
    }
    assert out["url"].startswith(f"http://testserver/v1/outputs/{job_id}/0?expires=")
    assert out["expires_at"] is not None
    assert job["undelivered"] == [{"index": 1, "reason": "nsfw filter"}]
    assert job["charged"] == 1 and job["refunded"] == 1
    assert client.get(out["url"]).content == png  # signed: no API key
    res = client.get(out["api_url"], headers=user[1])
    assert res.status_code == 200 and res.headers["content-type"] == "image/png"
    assert res.content == png
    assert client.get(f"/v1/jobs/{job_id}/outputs/1", headers=user[1]).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/outputs/0", headers=other[1]).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=user[1]).status_code == 409


def test_cancel_of_a_job_whose_lease_expired_ends_it_at_once_and_lists_attempts(
    client: TestClient, user: tuple[str, Headers], pg_engine: Engine
) -> None:
    job_id = submit(client, user[1]).json()["id"]
    attempt = execution.begin(pg_engine, job_id, "api-test-worker")
    assert attempt is not None
    running = client.get(f"/v1/jobs/{job_id}", headers=user[1]).json()
    assert [(a["number"], a["worker"], a["outcome"]) for a in running["attempts"]] == [
        (1, "api-test-worker", None)
    ]
    run_transaction(  # the worker died: nobody renewed its lease
        pg_engine,
        lambda c: c.execute(
            update(jobs_table)
            .where(jobs_table.c.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        ),
    )
    res = client.post(f"/v1/jobs/{job_id}/cancel", headers=user[1])
    assert res.status_code == 200 and res.json()["status"] == states.CANCELED
    job = client.get(f"/v1/jobs/{job_id}", headers=user[1]).json()
    assert (job["charged"], job["refunded"]) == (0, 1)
    (lost,) = job["attempts"]
    assert (lost["number"], lost["phase"], lost["outcome"]) == (1, "running", "lease_expired")
    assert lost["started_at"] and lost["ended_at"]
    # The worker was not dead after all: its late result is recorded, never charged.
    assert execution.finish(pg_engine, attempt, states.SUCCEEDED) == states.CANCELED
    assert client.get(f"/v1/jobs/{job_id}", headers=user[1]).json()["charged"] == 0


def test_a_submit_is_committed_before_its_answer_and_beat_dispatches_it_without_the_nudger(
    client: TestClient, user: tuple[str, Headers], pg_engine: Engine, redis_url: str
) -> None:
    app: Any = client.app
    saved = app.state.nudger
    app.state.nudger = Nudger(lambda: pg_engine, lambda: Publisher(redis_url))
    app.state.nudger.stop()  # as if the process died right after its answer: no pass runs
    try:
        res = client.post("/v1/jobs", json={"spec": TXT2IMG}, headers=user[1])
    finally:
        app.state.nudger = saved
    assert res.status_code == 202, res.text
    job_id = res.json()["id"]
    waiting = select(outbox.c.topic).where(
        outbox.c.job_id == job_id, outbox.c.published_at.is_(None)
    )
    assert run_transaction(pg_engine, lambda c: c.execute(waiting).scalars().all()) == ["event"]
    nudge(pg_engine, Publisher(redis_url))  # beat's periodic dispatcher
    relay(pg_engine, Publisher(redis_url))  # and its re-publisher
    assert run_transaction(pg_engine, lambda c: c.execute(waiting).all()) == []
    assert client.get(f"/v1/jobs/{job_id}", headers=user[1]).json()["status"] == "dispatched"
