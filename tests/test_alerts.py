"""Low-balance alerts end to end: real PostgreSQL, Redis and a Celery worker serving the
callbacks queue. One signed `balance.low` webhook per crossing, re-armed by a top-up or a
refund of held credits; holds, settlements, voids and grant expiry all count."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import Engine, select
from standardwebhooks import Webhook

from billing.clock import utcnow
from billing.db import run_transaction
from billing.verify import verify
from orchestrator.jobs import service as jobs
from orchestrator.payments import purchases
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.scheduling.outbox import relay
from orchestrator.settlement import alerts
from orchestrator.settlement.reaper import reap
from orchestrator.storage import Storage
from orchestrator.tables import outbox
from tests.ledger_helpers import grant, new_account
from tests.support.services import celery_worker

DELIVERY_TIMEOUT_S = 30


class Receiver:
    """A localhost endpoint that records what it is sent."""

    def __init__(self) -> None:
        received: list[tuple[bytes, dict[str, str]]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                received.append(
                    (self.rfile.read(int(self.headers["Content-Length"])), dict(self.headers))
                )
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait(self, count: int) -> None:
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= count, f"{len(self.received)} of {count} webhooks arrived"


@pytest.fixture(scope="module")
def callback_worker(
    service_env: dict[str, str], settings_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    with celery_worker(
        service_env, tmp_path_factory.mktemp("logs"), queues="tollgate.callbacks", concurrency=1
    ) as proc:
        yield proc


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.shutdown()


def low_events(engine: Engine, account: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(outbox.c.payload).where(outbox.c.topic == "callback").order_by(outbox.c.id)
        ).scalars()
        return [
            p["body"]["data"]
            for p in rows
            if p["body"].get("type") == "balance.low"
            and p["body"]["data"].get("account_id") == account
        ]


def spec(credits: int) -> dict[str, Any]:
    return {"type": "txt2img", "prompt": "low", "steps": 20, "num_images": credits}


def test_one_signed_webhook_per_crossing_and_rearm(
    callback_worker: Any,
    receiver: Receiver,
    pg_engine: Engine,
    storage: Storage,
    redis_url: str,
    service_env: dict[str, str],
) -> None:
    account = new_account(pg_engine)
    grant(pg_engine, account, 20)
    view = alerts.set_alerts(pg_engine, account, {"image": 10}, receiver.url)
    assert view == {
        "webhook_url": receiver.url,
        "thresholds": {"image": 10},
        "armed": {"image": True},
    }
    publish = Publisher(redis_url)

    def submit(credits: int) -> str:
        job_id = str(jobs.submit(pg_engine, storage, account, spec(credits)).job["id"])
        return job_id

    first = [submit(8)]  # available 12: above
    assert low_events(pg_engine, account) == []
    first.append(submit(4))  # 8 < 10: the crossing
    first.append(submit(1))  # 7: still low, no second webhook
    events = low_events(pg_engine, account)
    assert [(e["kind"], e["available"], e["threshold"]) for e in events] == [("image", 8, 10)]
    relay(pg_engine, publish, job_id=first[1])  # the job's fast path publishes it
    receiver.wait(1)
    body, headers = receiver.received[0]
    secret = service_env["TOLLGATE_CALLBACK_SECRET"]
    delivered = Webhook(secret).verify(body, {k.lower(): v for k, v in headers.items()})
    assert delivered["type"] == "balance.low"
    assert delivered["data"]["id"] == headers["webhook-id"]

    for job_id in first:  # refunded: available back to 20, the alert re-arms
        jobs.cancel(pg_engine, account, job_id)
    assert alerts.set_alerts(pg_engine, account, {})["armed"] == {"image": True}
    second = [submit(8), submit(4)]  # 12, then 8 again: a new crossing
    assert len(low_events(pg_engine, account)) == 2
    relay(pg_engine, publish, job_id=second[1])
    receiver.wait(2)
    assert len(receiver.received) == 2
    for job_id in second:
        jobs.cancel(pg_engine, account, job_id)
    assert run_transaction(pg_engine, verify) == []


def test_voids_and_grant_expiry_cross_too(pg_engine: Engine) -> None:
    account = new_account(pg_engine)
    now = utcnow()
    expiring = grant(pg_engine, account, 6, expires_at=now + timedelta(minutes=5), now=now)
    pack = grant(pg_engine, account, 10)
    alerts.set_alerts(pg_engine, account, {"image": 8}, "http://127.0.0.1:9/hook")
    done = run_transaction(pg_engine, lambda c: purchases.void_grant(c, pack.reference, 5))
    assert done.voided == 5  # 11 left: above
    assert low_events(pg_engine, account) == []
    reap(pg_engine, now=now + timedelta(minutes=10))  # 6 expire: 5 < 8
    assert [e["available"] for e in low_events(pg_engine, account)] == [5]
    assert expiring.amount == 6
    run_transaction(pg_engine, lambda c: purchases.void_grant(c, pack.reference, None))
    assert len(low_events(pg_engine, account)) == 1  # still low: no second webhook
    assert run_transaction(pg_engine, verify) == []


def test_an_alert_set_below_its_threshold_waits_for_a_top_up(pg_engine: Engine) -> None:
    account = new_account(pg_engine)
    grant(pg_engine, account, 3)
    view = alerts.set_alerts(pg_engine, account, {"image": 5, "tune": 1})
    assert view["armed"] == {"image": False, "tune": False}
    assert alerts.set_alerts(pg_engine, account, {"tune": None})["thresholds"] == {"image": 5}
