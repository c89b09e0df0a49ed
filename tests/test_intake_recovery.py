"""The intake's failure handling: pending messages of dead consumers are claimed, poison is
bounded, transient errors are retried (not dead-lettered), a batch acknowledges what it
submitted (each message has its own outcome), and two consumers share work without doubles."""

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
from orchestrator.jobs import states, submission_batch
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
    calls: list[list[str | None]] = []

    def broken_submit(engine: Engine, storage: Storage, requests: Any) -> Any:
        calls.append([r.idempotency_key for r in requests])
        raise RuntimeError("a bug in submit")

    monkeypatch.setattr(submission_batch, "submit_many", broken_submit)
    message_id = xadd(rc, config, job_text(account, key="always-fails"))
    thread = _run_in_thread(consumer)
    try:
        wait_for(lambda: dead_letters(rc, config), what="the poison dead letter")
    finally:
        consumer.stop()
        thread.join(10)

    [dead] = dead_letters(rc, config)
    assert dead["kind"] == "poison" and dead["message_id"] == message_id
    assert calls == [["always-fails"]] * config.max_deliveries
    assert pending_count(rc, config) == 0


def test_a_transient_database_error_is_retried_not_dead_lettered(
    pg_engine: Engine,
    rc: redis.Redis,
    config: IntakeConfig,
    consumer: Consumer,
    account: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_submit = submission_batch.submit_many
    outage = OperationalError("INSERT ...", {}, Exception("server closed the connection"))
    failures = [outage]

    def flaky_submit(engine: Engine, storage: Storage, requests: Any) -> Any:
        if failures:
            return [failures.pop()] * len(requests)  # what an outage past the budget gives
        return real_submit(engine, storage, requests)

    monkeypatch.setattr(submission_batch, "submit_many", flaky_submit)
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


def test_a_batch_with_one_message_left_pending_still_acks_and_dispatches_the_rest(
    pg_engine: Engine,
    rc: redis.Redis,
    config: IntakeConfig,
    consumer: Consumer,
    account: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One message of a batch hits an outage on its own (it went alone and the database
    dropped): the others are acknowledged and dispatched, it stays pending."""
    real_submit = submission_batch.submit_many

    def third_fails(engine: Engine, storage: Storage, requests: Any) -> Any:
        out = real_submit(engine, storage, [r for i, r in enumerate(requests) if i != 2])
        outage = OperationalError("INSERT ...", {}, Exception("server closed the connection"))
        return [*out[:2], outage, *out[2:]]

    monkeypatch.setattr(submission_batch, "submit_many", third_fails)
    ids = [xadd(rc, config, job_text(account, key=f"batch-{i}")) for i in range(4)]
    assert consumer.step() == 0  # the start-up round: own pending messages (none)
    assert consumer.step() == 4  # one batch

    rows = sorted(jobs_of(pg_engine, account), key=lambda r: r.idempotency_key)
    assert [r.idempotency_key for r in rows] == ["batch-0", "batch-1", "batch-3"]
    # Relayed despite the outage: dispatched up to the free plan's running cap (2).
    assert [r.status for r in rows] == [states.DISPATCHED] * 2 + [states.QUEUED]
    still_pending = {p["message_id"] for p in rc.xpending_range(
        config.stream, config.group, min="-", max="+", count=10)}  # fmt: skip
    assert still_pending == {ids[2]}  # only what was not submitted stays pending
    accepted = {f.get("message_id") for _, f in rc.xrange(EVENTS_STREAM)}
    assert {ids[0], ids[1], ids[3]} <= accepted and ids[2] not in accepted
    assert dead_letters(rc, config) == []
    assert consumer.stats.retried == 1 and consumer.stats.accepted == 3


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
