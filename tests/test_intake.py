"""The Redis intake against real Redis and PostgreSQL: messages become jobs with holds,
refusals are dead-lettered, pending messages of dead consumers are claimed, poison is
bounded, consumers share work, and the client works end to end (parsing: test_messages.py;
the CLI: test_cli_jobs.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from billing import ledger
from billing.db import run_transaction
from orchestrator.client import DeadLettered, TollgateClient
from orchestrator.events import EVENTS_STREAM
from orchestrator.ingress.intake import Consumer
from orchestrator.ingress.messages import derived_key
from orchestrator.ingress.streams import IntakeConfig
from orchestrator.jobs import service as jobs
from orchestrator.jobs import states
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.scheduling.outbox import relay_quietly
from orchestrator.storage import Storage
from tests.intake_helpers import (
    TXT2IMG,
    dead_letters,
    drain,
    job_count,
    job_text,
    jobs_of,
    last_id,
    make_consumer,
    pending_count,
    private_config,
    wait_for,
    xadd,
)
from tests.ledger_helpers import available, grant, new_account

# --- one consumer, stepped ---------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("announced_slots")


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


def test_a_valid_message_becomes_a_dispatched_job_with_a_hold_and_is_acked(
    pg_engine: Engine, rc: redis.Redis, config: IntakeConfig, consumer: Consumer, account: str
) -> None:
    events_from = last_id(rc, EVENTS_STREAM)
    message_id = xadd(rc, config, job_text(account, key="order-1"))

    assert drain(consumer) == 1

    [row] = jobs_of(pg_engine, account)
    assert row.status == states.DISPATCHED  # the relay published the task after commit
    assert (row.idempotency_key, row.source, row.price) == ("order-1", "redis", 1)
    hold = run_transaction(pg_engine, lambda c: ledger.get_hold(c, row.id))
    assert hold is not None and (hold.status, hold.amount) == ("open", 1)
    assert available(pg_engine, account) == 9
    assert pending_count(rc, config) == 0
    assert rc.xlen(config.stream) == 0  # acknowledged messages are deleted
    assert dead_letters(rc, config) == []
    entries: Any = rc.xrange(EVENTS_STREAM, min=events_from)
    accepted = [f for _, f in entries if f.get("message_id") == message_id]
    assert accepted == [
        {
            "status": "accepted",
            "job_id": row.id,
            "job_status": states.QUEUED,
            "account_id": account,
            "idempotency_key": "order-1",
            "message_id": message_id,
        }
    ]


def test_the_same_key_twice_makes_one_job_and_one_hold(
    pg_engine: Engine, rc: redis.Redis, config: IntakeConfig, consumer: Consumer, account: str
) -> None:
    xadd(rc, config, job_text(account, key="same"))
    xadd(rc, config, job_text(account, key="same"))

    assert drain(consumer) == 2

    assert job_count(pg_engine, account) == 1
    assert available(pg_engine, account) == 9
    assert consumer.stats.accepted == 2 and dead_letters(rc, config) == []


def test_malformed_json_is_dead_lettered_and_the_consumer_keeps_going(
    pg_engine: Engine, rc: redis.Redis, config: IntakeConfig, consumer: Consumer, account: str
) -> None:
    bad_id = xadd(rc, config, "{not json")
    xadd(rc, config, job_text(account, key="after-the-bad-one"))

    drain(consumer)

    [dead] = dead_letters(rc, config)
    assert dead["job"] == "{not json" and dead["message_id"] == bad_id
    assert dead["consumer"] == "c1" and dead["kind"] == "malformed"
    assert "not valid JSON" in dead["reason"]
    assert [r.idempotency_key for r in jobs_of(pg_engine, account)] == ["after-the-bad-one"]
    assert pending_count(rc, config) == 0


def test_an_invalid_spec_is_dead_lettered_naming_the_field(
    pg_engine: Engine, rc: redis.Redis, config: IntakeConfig, consumer: Consumer, account: str
) -> None:
    xadd(rc, config, job_text(account, {**TXT2IMG, "steps": 9999}, key="bad-steps"))

    drain(consumer)

    [dead] = dead_letters(rc, config)
    assert dead["kind"] == "invalid_spec" and dead["field"] == "steps"
    assert "steps" in dead["reason"]
    assert dead["idempotency_key"] == "bad-steps" and dead["account_id"] == account
    assert job_count(pg_engine, account) == 0
    assert pending_count(rc, config) == 0


def test_the_webhook_events_filter_is_taken_and_a_bad_one_dead_lettered_naming_it(
    pg_engine: Engine, rc: redis.Redis, config: IntakeConfig, consumer: Consumer, account: str
) -> None:
    hook = {"callback_url": "http://127.0.0.1:9/hook"}
    xadd(rc, config, job_text(account, key="h1", webhook_events_filter=["progress"], **hook))
    xadd(rc, config, job_text(account, key="h2", webhook_events_filter=["done"], **hook))

    drain(consumer)

    [row] = jobs_of(pg_engine, account)
    assert row.webhook_events_filter == ["progress"] and row.idempotency_key == "h1"
    [dead] = dead_letters(rc, config)
    assert dead["kind"] == "invalid_spec" and dead["field"] == "webhook_events_filter"
    assert dead["idempotency_key"] == "h2"
    jobs.cancel(pg_engine, None, row.id)  # leave no credits held


def test_insufficient_credits_are_dead_lettered_and_a_rejected_job_is_recorded(
    pg_engine: Engine, rc: redis.Redis, config: IntakeConfig, consumer: Consumer
) -> None:
    poor = new_account(pg_engine)
    grant(pg_engine, poor, 3)
    xadd(rc, config, job_text(poor, {**TXT2IMG, "num_images": 4}, key="too-many"))

    drain(consumer)

    [dead] = dead_letters(rc, config)
    assert dead["kind"] == "insufficient_credits"
    assert (dead["needed"], dead["available"]) == ("4", "3")
    assert "needed 4, available 3" in dead["reason"]
    [row] = jobs_of(pg_engine, poor)
    assert row.status == states.REJECTED and row.id == dead["job_id"]
    assert available(pg_engine, poor) == 3


def test_an_unknown_account_is_dead_lettered(
    rc: redis.Redis, config: IntakeConfig, consumer: Consumer
) -> None:
    xadd(rc, config, job_text("acct_nobody", key="k"))

    drain(consumer)

    [dead] = dead_letters(rc, config)
    assert dead["kind"] == "unknown_account" and "acct_nobody" in dead["reason"]
    assert pending_count(rc, config) == 0


def test_an_idempotency_conflict_is_dead_lettered(
    pg_engine: Engine, rc: redis.Redis, config: IntakeConfig, consumer: Consumer, account: str
) -> None:
    xadd(rc, config, job_text(account, key="k"))
    xadd(rc, config, job_text(account, {**TXT2IMG, "prompt": "something else"}, key="k"))

    drain(consumer)

    [dead] = dead_letters(rc, config)
    assert dead["kind"] == "idempotency_conflict" and "different request" in dead["reason"]
    assert job_count(pg_engine, account) == 1


def test_a_dead_consumers_pending_message_is_claimed_and_processed_once(
    pg_engine: Engine, storage: Storage, redis_url: str, rc: redis.Redis, account: str
) -> None:
    config = private_config(claim_min_idle_ms=50, claim_interval_s=0)
    live = make_consumer(pg_engine, storage, redis_url, config, name="live")
    live.ensure_group()
    message_id = xadd(rc, config, job_text(account))  # no key: derived from the message id
    taken: Any = rc.xreadgroup(config.group, "dead", {config.stream: ">"}, count=10)
    assert taken[0][1][0][0] == message_id  # "dead" read it and will never ack

    time.sleep(0.1)
    drain(live)
    drain(live)  # a second round finds nothing more to claim

    [row] = jobs_of(pg_engine, account)
    assert row.idempotency_key == derived_key(message_id)
    assert live.stats.claimed == 1 and live.stats.accepted == 1
    assert pending_count(rc, config) == 0
    # Had "dead" woken up and processed it too, it would have been the same job.
    again = jobs.submit(
        pg_engine, storage, account, TXT2IMG, idempotency_key=derived_key(message_id)
    )
    assert not again.created and again.job["id"] == row.id


def test_a_message_delivered_too_often_is_dead_lettered_as_poison(
    pg_engine: Engine, storage: Storage, redis_url: str, rc: redis.Redis, account: str
) -> None:
    config = private_config(claim_min_idle_ms=0, claim_interval_s=0, max_deliveries=5)
    live = make_consumer(pg_engine, storage, redis_url, config, name="live")
    live.ensure_group()
    message_id = xadd(rc, config, job_text(account, key="crashes-consumers"))
    rc.xreadgroup(config.group, "crashed", {config.stream: ">"})
    rc.xclaim(config.stream, config.group, "crashed", 0, [message_id], retrycount=5)

    drain(live)

    [dead] = dead_letters(rc, config)
    assert dead["kind"] == "poison" and dead["message_id"] == message_id
    assert "delivered 6 times" in dead["reason"]
    assert job_count(pg_engine, account) == 0
    assert pending_count(rc, config) == 0


def _run_in_thread(consumer: Consumer) -> threading.Thread:
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    return thread


def test_a_message_that_keeps_failing_is_retried_then_dead_lettered(
    pg_engine: Engine,
    rc: redis.Redis,
    config: IntakeConfig,
    consumer: Consumer,
    account: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def broken_submit(*args: Any, **kwargs: Any) -> jobs.Submitted:
        calls.append(kwargs["idempotency_key"])
        raise RuntimeError("a bug in submit")

    monkeypatch.setattr(jobs, "submit", broken_submit)
    message_id = xadd(rc, config, job_text(account, key="always-fails"))
    thread = _run_in_thread(consumer)
    try:
        wait_for(lambda: dead_letters(rc, config), what="the poison dead letter")
    finally:
        consumer.stop()
        thread.join(10)

    [dead] = dead_letters(rc, config)
    assert dead["kind"] == "poison" and dead["message_id"] == message_id
    assert calls == ["always-fails"] * config.max_deliveries
    assert pending_count(rc, config) == 0


def test_a_transient_database_error_is_retried_not_dead_lettered(
    pg_engine: Engine,
    rc: redis.Redis,
    config: IntakeConfig,
    consumer: Consumer,
    account: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_submit = jobs.submit
    failures = [OperationalError("INSERT ...", {}, Exception("server closed the connection"))]

    def flaky_submit(*args: Any, **kwargs: Any) -> jobs.Submitted:
        if failures:
            raise failures.pop()
        return real_submit(*args, **kwargs)

    monkeypatch.setattr(jobs, "submit", flaky_submit)
    xadd(rc, config, job_text(account, key="survives-an-outage"))
    thread = _run_in_thread(consumer)
    try:
        wait_for(lambda: job_count(pg_engine, account) == 1, what="the job")
        wait_for(lambda: pending_count(rc, config) == 0, what="the ack")
    finally:
        consumer.stop()
        thread.join(10)

    assert not thread.is_alive()
    assert dead_letters(rc, config) == []
    assert consumer.stats.retried == 1 and consumer.stats.accepted == 1


def test_a_batch_interrupted_by_an_outage_still_acks_and_dispatches_what_it_submitted(
    pg_engine: Engine,
    rc: redis.Redis,
    config: IntakeConfig,
    consumer: Consumer,
    account: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_submit = jobs.submit
    calls = {"n": 0}

    def third_fails(*args: Any, **kwargs: Any) -> jobs.Submitted:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OperationalError("INSERT ...", {}, Exception("server closed the connection"))
        return real_submit(*args, **kwargs)

    monkeypatch.setattr(jobs, "submit", third_fails)
    ids = [xadd(rc, config, job_text(account, key=f"batch-{i}")) for i in range(4)]
    assert consumer.step() == 0  # the start-up round: own pending messages (none)
    # One batch: two submitted, the third hits the outage, the fourth is not tried.
    assert consumer.step() == 3

    rows = sorted(jobs_of(pg_engine, account), key=lambda r: r.idempotency_key)
    assert [r.idempotency_key for r in rows] == ["batch-0", "batch-1"]
    assert all(r.status == states.DISPATCHED for r in rows)  # relayed despite the outage
    still_pending = {p["message_id"] for p in rc.xpending_range(
        config.stream, config.group, min="-", max="+", count=10)}  # fmt: skip
    assert still_pending == set(ids[2:])  # only what was not submitted stays pending
    accepted = {f.get("message_id") for _, f in rc.xrange(EVENTS_STREAM)}
    assert set(ids[:2]) <= accepted and not set(ids[2:]) & accepted
    assert dead_letters(rc, config) == []


def test_two_consumers_share_fifty_messages_and_none_is_processed_twice(
    pg_engine: Engine, storage: Storage, redis_url: str, rc: redis.Redis
) -> None:
    owner = new_account(pg_engine)
    grant(pg_engine, owner, 100)
    config = private_config(block_ms=100, batch_size=4)
    consumers = [make_consumer(pg_engine, storage, redis_url, config, name=n) for n in "ab"]
    consumers[0].ensure_group()
    pipe = rc.pipeline()
    for i in range(50):  # half with a key, half with a key derived from the message id
        pipe.xadd(config.stream, {"job": job_text(owner, key=f"k{i}" if i % 2 else None)})
    pipe.execute()

    threads = [_run_in_thread(c) for c in consumers]
    try:
        wait_for(lambda: job_count(pg_engine, owner) >= 50, 30, "50 jobs")
        wait_for(lambda: pending_count(rc, config) == 0, what="all acks")
    finally:
        for c in consumers:
            c.stop()
        for t in threads:
            t.join(10)

    rows = jobs_of(pg_engine, owner)
    assert len(rows) == 50 and len({r.idempotency_key for r in rows}) == 50
    assert sum(c.stats.accepted for c in consumers) == 50  # no message handled twice
    assert available(pg_engine, owner) == 50
    assert dead_letters(rc, config) == []
    assert rc.xlen(config.stream) == 0


# --- client -----------------------------------------------------------------------------


def test_client_submit_and_wait_follow_the_job_to_its_end(
    pg_engine: Engine,
    redis_url: str,
    rc: redis.Redis,
    config: IntakeConfig,
    consumer: Consumer,
    account: str,
) -> None:
    client = TollgateClient(redis_url, jobs_stream=config.stream, dead_stream=config.dead_stream)
    sub = client.submit(account, TXT2IMG)
    assert sub.idempotency_key.startswith("client-") and sub.message_id
    drain(consumer)
    [row] = jobs_of(pg_engine, account)
    assert row.idempotency_key == sub.idempotency_key
    rc.xadd(EVENTS_STREAM, {"job_id": row.id, "status": "running", "step": "3", "total": "10"})
    jobs.cancel(pg_engine, account, row.id)
    relay_quietly(pg_engine, Publisher(redis_url), row.id)

    progress: list[tuple[int, int]] = []
    statuses: list[str] = []
    outcome = client.wait(
        sub,
        timeout_s=10,
        on_progress=lambda step, total: progress.append((step, total)),
        on_status=lambda _job, status: statuses.append(status),
    )

    assert (outcome.job_id, outcome.status) == (row.id, states.CANCELED)
    assert outcome.event["refunded"] == "1" and not outcome.succeeded
    assert progress == [(3, 10)]
    assert statuses[0] == states.QUEUED  # from the accepted event
    assert statuses[-1] == states.CANCELED
    # By idempotency key and by job id too.
    assert client.wait(sub.idempotency_key, timeout_s=10).status == states.CANCELED
    assert client.wait(row.id, timeout_s=10).status == states.CANCELED
    client.close()


def test_client_wait_raises_the_dead_letter_reason(
    redis_url: str, config: IntakeConfig, consumer: Consumer
) -> None:
    client = TollgateClient(redis_url, jobs_stream=config.stream, dead_stream=config.dead_stream)
    sub = client.submit("acct_nobody", TXT2IMG, idempotency_key="mine")
    drain(consumer)

    with pytest.raises(DeadLettered, match="unknown account") as caught:
        client.wait(sub, timeout_s=10)
    assert caught.value.kind == "unknown_account"
    assert caught.value.fields["message_id"] == sub.message_id
    client.close()


def test_an_unknown_spec_field_is_dead_lettered_naming_it(
    pg_engine: Engine, rc: redis.Redis, config: IntakeConfig, consumer: Consumer, account: str
) -> None:
    xadd(rc, config, job_text(account, {**TXT2IMG, "num_image": 4}, key="typo"))

    drain(consumer)

    [dead] = dead_letters(rc, config)
    assert dead["kind"] == "invalid_spec" and dead["field"] == "num_image"
    assert "unknown field" in dead["reason"]
    assert job_count(pg_engine, account) == 0
    assert available(pg_engine, account) == 10  # nothing held
