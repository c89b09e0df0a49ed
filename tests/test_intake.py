"""The Redis intake against real Redis and PostgreSQL, one consumer stepped: messages become
jobs with holds; refusals (malformed, invalid, unknown field, no credits, unknown account,
idempotency conflict) are dead-lettered naming the cause. Recovery: test_intake_recovery.py;
the client: test_intake_client.py; parsing: test_messages.py; the CLI: test_cli_jobs.py."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from sqlalchemy import Engine

from billing import ledger
from billing.db import run_transaction
from orchestrator.events import EVENTS_STREAM
from orchestrator.ingress.intake import Consumer
from orchestrator.ingress.streams import IntakeConfig
from orchestrator.jobs import service as jobs
from orchestrator.jobs import states
from tests.intake_fixtures import *  # noqa: F403  (rc, config, consumer, account)
from tests.intake_helpers import (
    TXT2IMG,
    dead_letters,
    drain,
    job_count,
    job_text,
    jobs_of,
    last_id,
    pending_count,
    xadd,
)
from tests.ledger_helpers import available, grant, new_account

pytestmark = pytest.mark.usefixtures("announced_slots")


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
