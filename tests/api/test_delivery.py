"""Output delivery over HTTP on local storage: HMAC-signed output URLs (no API key, 403 when
expired or tampered with), output retention (410 on both URL kinds, the job and its charges
kept), and the webhook fields of a job (validation of webhook_events_filter)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from billing.clock import utcnow
from orchestrator.api import output_urls
from orchestrator.execution import protocol as execution
from orchestrator.jobs import states
from orchestrator.settlement.output_retention import sweep_outputs
from orchestrator.storage import Storage
from tests.api_helpers import TXT2IMG, Headers, image_bytes, submit


def delivered_job(client: TestClient, headers: Headers, engine: Engine, storage: Storage) -> Any:
    job_id = submit(client, headers).json()["id"]
    attempt = execution.begin(engine, job_id, "api-test-worker")
    assert attempt is not None
    ctx = execution.RunContext(engine, storage, attempt)
    ctx.deliver(0, image_bytes(), {"seed": 1})
    assert execution.finish(engine, attempt, states.SUCCEEDED, ctx=ctx) == states.SUCCEEDED
    return client.get(f"/v1/jobs/{job_id}", headers=headers).json()


def test_a_signed_output_url_works_without_a_key_until_it_expires(
    client: TestClient, user: tuple[str, Headers], pg_engine: Engine, storage: Storage
) -> None:
    job = delivered_job(client, user[1], pg_engine, storage)
    [out] = job["outputs"]
    res = client.get(out["url"])  # no Authorization header
    assert res.status_code == 200 and res.content == image_bytes()
    expires = int(out["url"].split("expires=")[1].split("&")[0])
    assert abs(expires - (time.time() + 3600)) < 60  # TOLLGATE_OUTPUT_URL_TTL_S default
    assert out["expires_at"].startswith(time.strftime("%Y-%m-%d", time.gmtime(expires)))
    tampered = out["url"].replace("/0?", "/1?")
    assert client.get(tampered).status_code == 403
    assert client.get(out["url"][:-4] + "0000").status_code == 403
    # Signed an hour and a second ago: its hour is up.
    old = output_urls.signer(storage, "http://testserver", now_s=time.time() - 3601)
    expired_url, _ = old(job["id"], 0, "unused-on-local-storage")
    res = client.get(expired_url)
    assert res.status_code == 403 and "expired" in res.json()["detail"]
    assert client.get(f"/v1/outputs/{job['id']}/0").status_code == 422  # unsigned


def test_retention_deletes_outputs_by_plan_and_answers_410(
    client: TestClient, user: tuple[str, Headers], pg_engine: Engine, storage: Storage
) -> None:
    job = delivered_job(client, user[1], pg_engine, storage)
    [out] = job["outputs"]
    key = f"outputs/{job['id']}/a1_0.png"
    assert storage.exists(key)
    # Free plan: 7 days. Day 6 keeps it; day 8 deletes it.
    assert (
        job["id"]
        not in sweep_outputs(
            pg_engine, storage, utcnow() + timedelta(days=6), account_id=user[0]
        ).jobs
    )
    swept = sweep_outputs(pg_engine, storage, utcnow() + timedelta(days=8), account_id=user[0])
    assert job["id"] in swept.jobs and not storage.exists(key)
    assert client.get(out["url"]).status_code == 410
    assert client.get(out["api_url"], headers=user[1]).status_code == 410
    after = client.get(f"/v1/jobs/{job['id']}", headers=user[1]).json()
    assert after["outputs_deleted_at"] is not None
    assert after["outputs"][0]["deleted"] is True and after["outputs"][0]["url"] is None
    assert (after["status"], after["charged"]) == ("succeeded", 1)  # the record stays
    assert (
        job["id"]
        not in sweep_outputs(
            pg_engine, storage, utcnow() + timedelta(days=9), account_id=user[0]
        ).jobs
    )


def test_paid_plans_keep_outputs_30_days_and_inputs_go_too(
    client: TestClient, pg_engine: Engine, storage: Storage, made_accounts: list[str]
) -> None:
    from tests.api_helpers import make_account

    acc, headers = make_account(client, made_accounts, credits=5, plan="standard")
    upload = client.post(
        "/v1/images", content=image_bytes(), headers={**headers, "Content-Type": "image/png"}
    )
    assert upload.status_code == 201, upload.text
    job = delivered_job(client, headers, pg_engine, storage)
    image_id = upload.json()["image_id"]
    at = utcnow()
    assert (
        job["id"]
        not in sweep_outputs(pg_engine, storage, at + timedelta(days=29), account_id=acc).jobs
    )
    swept = sweep_outputs(pg_engine, storage, at + timedelta(days=31), account_id=acc)
    assert job["id"] in swept.jobs and image_id in swept.images
    res = client.post(
        "/v1/jobs", json={"spec": {"type": "upscale", "image_id": image_id}}, headers=headers
    )
    assert res.status_code == 422 and "retention" in res.json()["detail"]


def test_webhook_events_filter_is_validated_and_shown(
    client: TestClient, user: tuple[str, Headers]
) -> None:
    for bad in ("start", ["start", "start"], ["finished"], [], [1]):
        res = client.post(
            "/v1/jobs",
            json={
                "spec": TXT2IMG,
                "callback_url": "http://127.0.0.1:9/hook",
                "webhook_events_filter": bad,
            },
            headers=user[1],
        )
        assert res.status_code == 422, bad
        assert res.json()["field"] == "webhook_events_filter", res.json()
    res = client.post(
        "/v1/jobs",
        json={
            "spec": TXT2IMG,
            "callback_url": "http://127.0.0.1:9/hook",
            "webhook_events_filter": ["completed", "start"],
        },
        headers=user[1],
    )
    assert res.status_code == 202
    webhook = res.json()["webhook"]
    assert webhook["events"] == ["start", "completed"] and webhook["attempts"] is None
    plain = submit(client, user[1]).json()
    assert plain["webhook"] is None  # no callback_url
