"""The intake's failure handling: pending messages of dead consumers are claimed, poison is
bounded, transient errors are retried (not dead-lettered), an interrupted batch still
acknowledges what it submitted, and two consumers share work without doubles."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from orchestrator.events import EVENTS_STREAM
from orchestrator.ingress.intake import Consumer
from orchestrator.ingress.messages import derived_key
from orchestrator.ingress.streams import IntakeConfig
from orchestrator.jobs import service as jobs
from orchestrator.jobs import states
from orchestrator.storage import Storage
from tests.intake_fixtures import *  # noqa: F403  (rc, config, consumer, account)
from tests.intake_helpers import (
    TXT2IMG,
    dead_letters,
    drain,
    job_count,
    job_text,
    jobs_of,
    make_consumer,
    pending_count,
    private_config,
    wait_for,
    xadd,
)
from tests.ledger_helpers import available, grant, new_account

pytestmark = pytest.mark.usefixtures("announced_slots")


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
