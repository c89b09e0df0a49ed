"""Buying credits through Stripe webhooks, on real PostgreSQL through the HTTP app: packs,
replays, signatures, refunds after part of a pack was spent or is held by a running job,
subscriptions that renew and lapse, admin voids and the readable ledger. Payloads are
signed in the test as Stripe documents; nothing calls Stripe."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from billing.db import run_transaction
from billing.tables import accounts, grants
from billing.verify import verify
from orchestrator.execution import protocol as execution
from orchestrator.jobs import service as jobs
from orchestrator.jobs import states
from orchestrator.payments import purchases
from orchestrator.storage import Storage
from tests import stripe_helpers as sh
from tests.api_helpers import ADMIN, Headers, env_overridden, make_account


@pytest.fixture(scope="module", autouse=True)
def stripe_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("packs") / "packs.toml"
    path.write_text(sh.PACKS_TOML)
    with env_overridden(TOLLGATE_STRIPE_WEBHOOK_SECRET=sh.SECRET, TOLLGATE_CREDIT_PACKS=str(path)):
        yield path


@pytest.fixture
def buyer(client: TestClient, made_accounts: list[str]) -> tuple[str, Headers]:
    return make_account(client, made_accounts)


def balance(client: TestClient, headers: Headers, kind: str = "image") -> dict[str, int]:
    res = client.get("/v1/balance", headers=headers)
    assert res.status_code == 200, res.text
    found: dict[str, int] = res.json()[kind]
    return found


def clean(engine: Engine) -> None:
    assert run_transaction(engine, verify) == []


def test_a_pack_is_granted_once_and_replays_change_nothing(
    client: TestClient, buyer: tuple[str, Headers], pg_engine: Engine
) -> None:
    account, headers = buyer
    session = sh.checkout(account)
    evt = sh.event("checkout.session.completed", session)
    res = sh.post(client, evt)
    assert res.status_code == 200, res.text
    assert res.json()["outcome"] == "processed"
    assert balance(client, headers)["available"] == 100
    again = sh.post(client, evt)  # Stripe redelivers the same event
    assert (again.status_code, again.json()["outcome"]) == (200, "duplicate")
    # Another event for the same session (e.g. async_payment_succeeded) grants nothing more.
    other = sh.post(client, sh.event("checkout.session.async_payment_succeeded", session))
    assert other.status_code == 200
    assert balance(client, headers)["available"] == 100
    page = client.get("/v1/ledger", headers=headers).json()["entries"]
    assert [(e["type"], e["reference"], e["source"]) for e in page] == [
        ("grant", f"stripe:{session['id']}:price_img_100", "purchase")
    ]
    clean(pg_engine)


def test_pack_expiry_and_quantity_come_from_the_packs_file(
    client: TestClient, buyer: tuple[str, Headers], pg_engine: Engine
) -> None:
    account, headers = buyer
    session = sh.checkout(account, "price_img_10_expiring")
    session["metadata"]["tollgate_quantity"] = "3"
    assert sh.post(client, sh.event("checkout.session.completed", session)).status_code == 200
    assert balance(client, headers)["available"] == 30
    with pg_engine.connect() as conn:
        g = conn.execute(select(grants).where(grants.c.account_id == account)).one()
    assert g.expires_at is not None
    assert timedelta(days=29) < g.expires_at - datetime.now(UTC) <= timedelta(days=30)


def test_unpaid_foreign_and_unknown_price_checkouts(
    client: TestClient, buyer: tuple[str, Headers]
) -> None:
    account, headers = buyer
    unpaid = sh.checkout(account, payment_status="unpaid")
    res = sh.post(client, sh.event("checkout.session.completed", unpaid))
    assert (res.status_code, res.json()["outcome"]) == (200, "ignored")
    foreign = sh.checkout(account)
    foreign["metadata"] = {}
    res = sh.post(client, sh.event("checkout.session.completed", foreign))
    assert (res.status_code, res.json()["outcome"]) == (200, "ignored")
    # A price the packs file does not know: 400, nothing recorded, so a retry after the
    # packs file is fixed is processed.
    unknown = sh.checkout(account, "price_not_configured")
    evt = sh.event("checkout.session.completed", unknown)
    res = sh.post(client, evt)
    assert res.status_code == 400 and "price_not_configured" in res.json()["detail"]
    assert balance(client, headers)["available"] == 0


def test_bad_stale_and_malformed_requests_get_400(
    client: TestClient, buyer: tuple[str, Headers]
) -> None:
    account, headers = buyer
    evt = sh.event("checkout.session.completed", sh.checkout(account))
    payload = json.dumps(evt).encode()

    def send(body: bytes, signature: str | None) -> Any:
        extra = {} if signature is None else {"Stripe-Signature": signature}
        return client.post(sh.WEBHOOK, content=body, headers=extra)

    assert send(payload, sh.sign(payload, secret="whsec_wrong")).status_code == 400
    stale = sh.sign(payload, timestamp=int(time.time()) - 3600)  # tolerance is 300 s
    res = send(payload, stale)
    assert res.status_code == 400 and "Stripe-Signature" in res.json()["detail"]
    assert send(payload, None).status_code == 400
    assert send(payload, "garbage").status_code == 400
    tampered = payload.replace(b'"price_img_100"', b'"price_tune_image_64"')
    assert send(tampered, sh.sign(payload)).status_code == 400
    for body in (b"not json", b"[1, 2]", b"{}", json.dumps({"id": "evt_1"}).encode()):
        assert send(body, sh.sign(body)).status_code == 400, body
    bad_refund = sh.event("charge.refunded", {"id": "ch_1", "amount": "lots"})
    assert sh.post(client, bad_refund).status_code == 400
    assert balance(client, headers)["available"] == 0
    # Still processable after all that: the genuine delivery goes through.
    assert send(payload, sh.sign(payload)).json()["outcome"] == "processed"


def test_unknown_event_types_are_200_and_counted(client: TestClient) -> None:
    for _ in range(2):
        res = sh.post(client, sh.event("customer.created", {"id": "cus_1", "object": "customer"}))
        assert (res.status_code, res.json()["outcome"]) == (200, "unhandled")
    metrics = client.get("/metrics").text
    line = (
        "tollgate_payment_events_total"
        '{outcome="unhandled",provider="stripe",type="customer.created"}'
    )
    assert f"{line} 2.0" in metrics


def _run_job(
    engine: Engine, storage: Storage, account: str, num_images: int
) -> tuple[str, execution.RunContext]:
    spec = {"type": "txt2img", "prompt": "a pack", "steps": 20, "num_images": num_images}
    job_id = jobs.submit(engine, storage, account, spec).job["id"]
    attempt = execution.begin(engine, job_id, "test-worker")  # running, as a worker takes it
    assert attempt is not None
    return job_id, execution.RunContext(engine, storage, attempt)


def test_refund_after_part_of_the_pack_was_spent_and_part_is_held(
    client: TestClient, buyer: tuple[str, Headers], pg_engine: Engine, storage: Storage
) -> None:
    account, headers = buyer
    session = sh.checkout(account, payment_intent=None, amount_total=1000)
    pi = session["payment_intent"]
    assert sh.post(client, sh.event("checkout.session.completed", session)).status_code == 200
    spent_id, spent = _run_job(pg_engine, storage, account, 8)
    for i in range(8):
        spent.deliver(i, f"png-{i}".encode(), {"seed": i})
    assert execution.finish(pg_engine, spent.attempt, states.SUCCEEDED, ctx=spent) == "succeeded"
    running_id, running = _run_job(pg_engine, storage, account, 8)
    assert balance(client, headers) == {"balance": 92, "held": 8, "available": 84}

    half = sh.post(client, sh.event("charge.refunded", sh.charge(pi, 1000, 500)))
    assert half.status_code == 200, half.text
    assert balance(client, headers) == {"balance": 42, "held": 8, "available": 34}
    full = sh.event("charge.refunded", sh.charge(pi, 1000, 1000))
    assert sh.post(client, full).status_code == 200
    # 34 free credits voided; 16 not there: 8 spent (shortfall for good), 8 held.
    assert balance(client, headers) == {"balance": 8, "held": 8, "available": 0}
    assert sh.post(client, full).json()["outcome"] == "duplicate"
    # The running job fails: its 8 credits go back to the refunded pack and are voided.
    execution.finish(pg_engine, running.attempt, states.FAILED, "test over", ctx=running)
    assert balance(client, headers) == {"balance": 0, "held": 0, "available": 0}
    with pg_engine.connect() as conn:
        g = conn.execute(select(grants).where(grants.c.account_id == account)).one()
    assert (g.voided, g.void_shortfall, g.remaining) == (92, 8, 0)
    page = client.get("/v1/ledger", headers=headers).json()["entries"]
    voids = [e for e in page if e["type"] == "void"]
    assert [e["delta_balance"] for e in voids] == [-8, -34, -50]  # newest first
    assert {e["reference"] for e in voids} == {f"stripe:{session['id']}:price_img_100"}
    commits = [e for e in page if e["type"] == "commit"]
    assert [(c["job_id"], c["delta_balance"]) for c in commits] == [(spent_id, -8)]
    assert {e["job_id"] for e in page if e["type"] == "release"} == {running_id}
    clean(pg_engine)


def test_a_refund_that_arrives_before_its_purchase_is_applied_by_it(
    client: TestClient, buyer: tuple[str, Headers], pg_engine: Engine
) -> None:
    account, headers = buyer
    session = sh.checkout(account)
    pi = session["payment_intent"]
    for refunded in (300, 250):  # out of order too: the larger cumulative amount counts
        res = sh.post(client, sh.event("charge.refunded", sh.charge(pi, 1000, refunded)))
        assert (res.status_code, res.json()["outcome"]) == (200, "processed")
        assert "nothing" in res.json()["detail"]
    assert sh.post(client, sh.event("checkout.session.completed", session)).status_code == 200
    assert balance(client, headers)["available"] == 70  # 100 bought, 30% refunded
    clean(pg_engine)


def _account(engine: Engine, account: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(accounts).where(accounts.c.id == account)).one()


def test_a_subscription_renews_then_lapses_at_the_period_end(
    client: TestClient, buyer: tuple[str, Headers], pg_engine: Engine
) -> None:
    account, headers = buyer
    sub = "sub_" + account[-10:]
    linked = sh.checkout(account, mode="subscription", subscription=sub, payment_intent=None)
    assert sh.post(client, sh.event("checkout.session.completed", linked)).status_code == 200
    start = int(time.time())
    month = 30 * 24 * 3600
    first = sh.invoice(sub, start, start + month)
    res = sh.post(client, sh.event("invoice.paid", first))
    assert (res.status_code, res.json()["outcome"]) == (200, "processed"), res.text
    assert _account(pg_engine, account).plan == "standard"
    assert balance(client, headers) == {"balance": 500, "held": 0, "available": 500}
    assert balance(client, headers, "tune_image")["available"] == 64
    assert sh.post(client, sh.event("invoice.paid", first)).status_code == 200  # another event,
    assert balance(client, headers)["available"] == 500  # the same invoice: nothing more

    second = sh.invoice(sub, start + month, start + 2 * month)
    assert sh.post(client, sh.event("invoice.paid", second)).status_code == 200
    assert balance(client, headers)["available"] == 1000
    with pg_engine.connect() as conn:
        ends = conn.execute(
            select(grants.c.expires_at)
            .where(grants.c.account_id == account, grants.c.kind == "image")
            .order_by(grants.c.id)
        ).scalars()
        assert [int(e.timestamp()) for e in ends] == [start + month, start + 2 * month]

    still_active = {"id": sub, "object": "subscription", "status": "active"}
    res = sh.post(client, sh.event("customer.subscription.updated", still_active))
    assert res.json()["outcome"] == "ignored"
    period_end = start + 2 * month
    ended = {
        "id": sub,
        "object": "subscription",
        "status": "canceled",
        "items": {"data": [{"current_period_end": period_end}]},
    }
    res = sh.post(client, sh.event("customer.subscription.deleted", ended))
    assert res.status_code == 200 and "scheduled" in res.json()["detail"], res.text
    row = _account(pg_engine, account)
    assert row.plan == "standard" and row.plan_lapses_at is not None
    end_at = datetime.fromtimestamp(period_end, UTC)
    assert purchases.lapse_due(pg_engine, end_at - timedelta(seconds=1)) == []
    assert account in purchases.lapse_due(pg_engine, end_at + timedelta(seconds=1))
    row = _account(pg_engine, account)
    assert (row.plan, row.plan_lapsed_at, row.plan_lapses_at) == ("free", end_at, None)
    clean(pg_engine)


def test_a_subscription_canceled_after_its_period_lapses_at_once(
    client: TestClient, buyer: tuple[str, Headers], pg_engine: Engine
) -> None:
    account, _ = buyer
    sub = "sub_now_" + account[-10:]
    start = int(time.time()) - 40 * 24 * 3600
    paid = sh.invoice(sub, start, start + 30 * 24 * 3600)
    paid["parent"]["subscription_details"]["metadata"] = {"tollgate_account_id": account}
    assert sh.post(client, sh.event("invoice.paid", paid)).json()["outcome"] == "processed"
    assert _account(pg_engine, account).plan == "standard"
    ended = {
        "id": sub,
        "object": "subscription",
        "status": "canceled",
        "current_period_end": start + 30 * 24 * 3600,
    }
    res = sh.post(client, sh.event("customer.subscription.updated", ended))
    assert "lapsed" in res.json()["detail"], res.text
    row = _account(pg_engine, account)
    assert row.plan == "free"
    assert row.plan_lapsed_at == datetime.fromtimestamp(start + 30 * 24 * 3600, UTC)


def test_admin_void_route(
    client: TestClient, buyer: tuple[str, Headers], other: tuple[str, Headers], pg_engine: Engine
) -> None:
    account, headers = buyer
    ref = f"admin-void-{account}"
    res = client.post(
        f"/v1/accounts/{account}/grants",
        json={"kind": "image", "amount": 50, "reference": ref},
        headers=ADMIN,
    )
    assert res.status_code == 201
    url = f"/v1/accounts/{account}/grants/{ref}/void"
    res = client.post(url, json={"amount": 20}, headers=ADMIN)
    assert res.status_code == 200, res.text
    assert (res.json()["voided"], res.json()["shortfall"]) == (20, 0)
    res = client.post(url, json={"amount": 31}, headers=ADMIN)
    assert res.status_code == 422 and res.json()["field"] == "amount"
    assert client.post(url, json={"amount": 5}).status_code == 401  # admin only
    wrong = client.post(f"/v1/accounts/{other[0]}/grants/{ref}/void", headers=ADMIN)
    assert wrong.status_code == 404
    assert client.post(f"/v1/accounts/{account}/grants/nope/void", headers=ADMIN).status_code == 404
    res = client.post(url, headers=ADMIN)  # no body: all that is left
    assert (res.status_code, res.json()["voided"], res.json()["total_voided"]) == (200, 30, 50)
    assert balance(client, headers)["available"] == 0
    clean(pg_engine)


def _photo_b64() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_tune_image_credits_bought_start_the_waiting_render(
    client: TestClient, buyer: tuple[str, Headers], pg_engine: Engine, storage: Storage
) -> None:
    from orchestrator.tunes import service as tunes

    account, headers = buyer
    res = client.post(
        f"/v1/accounts/{account}/grants",
        json={"kind": "tune", "amount": 1, "reference": f"tune-{account}"},
        headers=ADMIN,
    )
    assert res.status_code == 201
    spec = {"type": "tune", "name": "me", "subject": "woman", "images_b64": [_photo_b64()] * 4}
    tune_id = jobs.submit(pg_engine, storage, account, spec).job["id"]
    # The training phase as a worker runs it (begin, then finish with success).
    attempt = execution.begin(pg_engine, tune_id, "test-worker", tunes.TRAINING_PHASE)
    assert attempt is not None
    execution.finish(pg_engine, attempt, states.SUCCEEDED, phase=tunes.TRAINING_PHASE)
    assert jobs.get(pg_engine, account, tune_id)["status"] == "awaiting_credits"

    session = sh.checkout(account, "price_tune_image_64")
    res = sh.post(client, sh.event("checkout.session.completed", session))
    assert res.status_code == 200, res.text
    assert jobs.get(pg_engine, account, tune_id)["status"] == "rendering"
    assert balance(client, headers, "tune_image") == {"balance": 64, "held": 64, "available": 0}
    # End the render here, as a worker would, so nothing stays active for a later module.
    render = execution.begin(pg_engine, tune_id, "test-worker", tunes.RENDER_PHASE)
    assert render is not None
    execution.finish(pg_engine, render, states.FAILED, "test over", phase=tunes.RENDER_PHASE)
    assert balance(client, headers, "tune_image") == {"balance": 64, "held": 0, "available": 64}
    clean(pg_engine)
