"""Job webhooks delivered for real: a Celery worker (scripted runners) POSTs to a receiver on
127.0.0.1; each delivery is verified with the `standardwebhooks` package."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from standardwebhooks import Webhook

from orchestrator.client import WebhookVerificationError, verify_webhook
from orchestrator.jobs import service as jobs
from orchestrator.jobs.webhooks import CALLBACK_RETRIES_MAX, PROGRESS_WEBHOOK_INTERVAL_S
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.scheduling.scheduler import nudge
from orchestrator.storage import Storage
from tests.conftest import TEST_WEBHOOK_SECRET
from tests.ledger_helpers import grant, new_account
from tests.lifecycle_helpers import row, wait_terminal, wait_until
from tests.support.receiver import Delivery, receiver
from tests.support.services import celery_worker


@pytest.fixture(scope="module")
def worker(
    service_env: dict[str, str], settings_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    with celery_worker(service_env, tmp_path_factory.mktemp("logs")) as proc:
        yield proc


@pytest.fixture
def account(pg_engine: Engine) -> str:
    acc = new_account(pg_engine)
    grant(pg_engine, acc, 20)
    return acc


def spec(test: str = "ok") -> dict[str, Any]:
    return {"type": "txt2img", "prompt": f"test:{test}", "steps": 20}


def start(engine: Engine, storage: Storage, redis_url: str, account: str, **hook: Any) -> str:
    job_id = str(
        jobs.submit(engine, storage, account, spec(hook.pop("test", "ok")), **hook).job["id"]
    )
    nudge(engine, Publisher(redis_url), job_id)  # a slot is free: dispatched and published
    return job_id


def verified(delivery: Delivery) -> dict[str, Any]:
    message: dict[str, Any] = Webhook(TEST_WEBHOOK_SECRET).verify(delivery.body, delivery.headers)
    return message


def test_default_filter_sends_completed_once_and_records_it(
    worker: Any, pg_engine: Engine, storage: Storage, redis_url: str, account: str
) -> None:
    with receiver() as hook:
        job_id = start(pg_engine, storage, redis_url, account, callback_url=hook.url)
        wait_terminal(pg_engine, job_id)
        [delivery] = hook.wait(1)
        done = wait_until(pg_engine, job_id, lambda r: r.webhook is not None)
    message = verified(delivery)
    assert delivery.headers["webhook-id"] == f"{job_id}.completed"
    assert message["type"] == "job.completed" and message["data"]["status"] == "succeeded"
    assert "X-Tollgate-Signature" not in delivery.headers
    assert len(hook.received) == 1
    shown = jobs.get(pg_engine, account, job_id)["webhook"]
    assert shown["events"] == ["completed"] and shown["last_status"] == 204
    assert shown["attempts"] == 1 and shown["delivered_at"] and "failed_at" not in done.webhook
    # The receiver-side helper agrees, and refuses a tampered body.
    assert verify_webhook(delivery.body, delivery.headers, TEST_WEBHOOK_SECRET) == message
    with pytest.raises(WebhookVerificationError):
        verify_webhook(delivery.body + b" ", delivery.headers, TEST_WEBHOOK_SECRET)


def test_start_progress_completed_with_progress_throttled(
    worker: Any, pg_engine: Engine, storage: Storage, redis_url: str, account: str
) -> None:
    with receiver() as hook:
        job_id = start(
            pg_engine,
            storage,
            redis_url,
            account,
            callback_url=hook.url,
            webhook_events_filter=["start", "progress", "completed"],
            test="sleep:6",
        )
        wait_terminal(pg_engine, job_id, timeout_s=60)
        wait_until(pg_engine, job_id, lambda r: (r.webhook or {}).get("event") == "completed")
        got = list(hook.received)
    messages = [verified(d) for d in got]
    types = [m["type"] for m in messages]
    assert types.count("job.start") == 1 and types.count("job.completed") == 1
    assert types[0] == "job.start" and types[-1] == "job.completed"
    progress = [(d, m) for d, m in zip(got, messages, strict=True) if m["type"] == "job.progress"]
    # 6 s of steps, progress written every 0.25 s: at most one webhook per 2 s gets through.
    assert 2 <= len(progress) <= 4, types
    gaps = [b.at - a.at for (a, _), (b, _) in zip(progress, progress[1:], strict=False)]
    # Sent >= 2 s apart; arrival times also carry the queueing jitter of the callback task.
    assert all(gap >= PROGRESS_WEBHOOK_INTERVAL_S / 2 for gap in gaps), gaps
    steps = [m["data"]["progress"]["step"] for _, m in progress]
    assert steps == sorted(steps) and all(m["data"]["status"] == "running" for _, m in progress)
    ids = [d.headers["webhook-id"] for d in got]
    assert len(set(ids)) == len(ids) and f"{job_id}.start" in ids
    assert all(
        i.startswith(f"{job_id}.progress.")
        for i, m in zip(ids, messages, strict=True)
        if m["type"] == "job.progress"
    )


def test_a_retried_delivery_keeps_its_webhook_id(
    worker: Any, pg_engine: Engine, storage: Storage, redis_url: str, account: str
) -> None:
    with receiver(fail_first=2) as hook:
        job_id = start(pg_engine, storage, redis_url, account, callback_url=hook.url)
        got = hook.wait(3)
        done = wait_until(pg_engine, job_id, lambda r: (r.webhook or {}).get("last_status") == 204)
    assert {d.headers["webhook-id"] for d in got} == {f"{job_id}.completed"}
    assert all(verified(d)["data"]["id"] == job_id for d in got)
    assert done.webhook["attempts"] == 3


def test_after_the_last_retry_the_delivery_is_recorded_failed(
    worker: Any, pg_engine: Engine, storage: Storage, redis_url: str, account: str
) -> None:
    with receiver(status=503) as hook:
        job_id = start(pg_engine, storage, redis_url, account, callback_url=hook.url)
        wait_until(pg_engine, job_id, lambda r: (r.webhook or {}).get("failed_at"), timeout_s=90)
        got = list(hook.received)
    assert len(got) == CALLBACK_RETRIES_MAX + 1  # bounded: the first try and 6 retries
    assert {d.headers["webhook-id"] for d in got} == {f"{job_id}.completed"}
    shown = jobs.get(pg_engine, account, job_id)["webhook"]
    assert shown["last_status"] == 503 and shown["attempts"] == CALLBACK_RETRIES_MAX + 1
    assert shown["failed_at"] and "503" in shown["last_error"]
    assert row(pg_engine, job_id).status == "succeeded"  # the job itself is unaffected
    assert json.loads(got[0].body)["data"]["charged"] == 1


def test_the_callback_secret_must_be_a_whsec_secret() -> None:
    from pydantic import ValidationError

    from orchestrator.settings import Settings, new_webhook_secret

    for bad in ("change-me", "whsec_not-base64!", "whsec_" + "QUJD"):  # the last: 3 bytes
        with pytest.raises(ValidationError, match="callback_secret"):
            Settings(callback_secret=bad)
    made = new_webhook_secret()
    assert Settings(callback_secret=made).callback_secret == made
    assert Settings(callback_secret="").callback_secret == ""
    Webhook(made)  # the standardwebhooks package takes it
