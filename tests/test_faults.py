"""Transient faults on real PostgreSQL and Redis: classification, retries through an outage
made by a TCP proxy (cut, then restored), ambiguous commits (COMMIT applied, its answer
lost), and a rejection replayed after a crash before its dead letter."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from billing import ledger
from billing.db import is_conflict, is_transient, make_engine, run_transaction
from billing.tables import holds
from orchestrator import faults
from orchestrator.execution import protocol as execution
from orchestrator.ingress.intake import Consumer
from orchestrator.jobs import service as jobs
from orchestrator.jobs import states, submission_batch
from orchestrator.storage import Storage
from orchestrator.tables import job_results
from orchestrator.tables import jobs as jobs_table
from tests.intake_helpers import (
    dead_letters,
    job_text,
    jobs_of,
    make_consumer,
    pending_count,
    private_config,
    xadd,
)
from tests.ledger_helpers import grant, new_account
from tests.support.tcp_proxy import TcpProxy

SPEC = {"type": "txt2img", "prompt": "a lighthouse", "steps": 20, "num_images": 2}


@pytest.fixture
def pg_proxy(pg_url: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy(make_url(pg_url).port or 5432)
    yield proxy
    proxy.close()


@pytest.fixture
def proxied_engine(pg_url: str, pg_proxy: TcpProxy) -> Iterator[Engine]:
    url = make_url(pg_url).set(host="127.0.0.1", port=pg_proxy.port)
    engine = make_engine(url.render_as_string(hide_password=False))
    yield engine
    engine.dispose()


def retries(dependency: str, process: str = "cli") -> float:
    value = faults.TRANSIENT_RETRIES.labels(process, dependency)._value.get()
    return float(value)


def restore_after(proxy: TcpProxy, delay_s: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), proxy.restore()), daemon=True)
    thread.start()
    return thread


def test_disconnects_are_transient_and_conflicts_are_not(
    pg_engine: Engine, pg_url: str, proxied_engine: Engine, pg_proxy: TcpProxy
) -> None:
    # A connection terminated by the server (pg_terminate_backend: SQLSTATE 57P01).
    with proxied_engine.connect() as victim:
        pid = victim.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with pg_engine.connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as terminated:
            victim.execute(text("SELECT 1"))
    assert is_transient(terminated.value) and not is_conflict(terminated.value)
    # A server that refuses connections.
    pg_proxy.cut()
    with pytest.raises(DBAPIError) as refused, proxied_engine.connect():
        pass
    assert is_transient(refused.value)
    pg_proxy.restore()
    # A unique violation is a conflict (rerun), a syntax error neither.
    account = new_account(pg_engine)
    with pytest.raises(DBAPIError) as duplicate, pg_engine.begin() as conn:
        conn.execute(
            text("INSERT INTO accounts SELECT * FROM accounts WHERE id = :a"), {"a": account}
        )
    assert is_conflict(duplicate.value) and not is_transient(duplicate.value)
    with pytest.raises(DBAPIError) as bad, pg_engine.begin() as conn:
        conn.execute(text("SELEKT 1"))
    assert not is_transient(bad.value) and not is_conflict(bad.value)


def test_a_transaction_rides_out_an_outage(proxied_engine: Engine, pg_proxy: TcpProxy) -> None:
    run_transaction(proxied_engine, lambda c: c.execute(text("SELECT 1")).scalar_one())  # pooled
    before = retries("postgresql")
    pg_proxy.cut()
    restore_after(pg_proxy, 1.0)
    started = time.monotonic()
    value = run_transaction(proxied_engine, lambda c: c.execute(text("SELECT 7")).scalar_one())
    assert value == 7
    assert 0.9 < time.monotonic() - started < 5
    assert retries("postgresql") > before


def test_a_transaction_gives_up_after_its_budget(
    proxied_engine: Engine, pg_proxy: TcpProxy
) -> None:
    pg_proxy.cut()
    started = time.monotonic()
    with pytest.raises(DBAPIError) as gave_up:
        run_transaction(proxied_engine, lambda c: c.execute(text("SELECT 1")), budget_s=0.5)
    assert time.monotonic() - started < 2
    assert is_transient(gave_up.value)
    pg_proxy.restore()
    assert run_transaction(proxied_engine, lambda c: c.execute(text("SELECT 1")).scalar_one())


def _job_rows(engine: Engine, account: str) -> int:
    return run_transaction(
        engine,
        lambda c: c.execute(
            select(func.count()).select_from(jobs_table).where(jobs_table.c.account_id == account)
        ).scalar_one(),
    )


def test_submit_after_a_lost_commit_answer_finds_its_own_job(
    pg_engine: Engine, proxied_engine: Engine, pg_proxy: TcpProxy, storage: Storage
) -> None:
    account = new_account(pg_engine)
    grant(pg_engine, account, 10)
    # The usual submit is one statement, its own transaction (orchestrator.db_direct): the
    # answer lost is the statement's; the full path that follows finds the job.
    pg_proxy.lose_next_answer(b"tollgate_ledger_hold")
    submitted = jobs.submit(proxied_engine, storage, account, dict(SPEC))
    assert pg_proxy.answers_lost == 1
    assert submitted.created and submitted.job["status"] == states.QUEUED
    assert _job_rows(pg_engine, account) == 1
    hold = run_transaction(pg_engine, lambda c: ledger.get_hold(c, submitted.job["id"]))
    assert hold is not None and hold.amount == 2
    jobs.cancel(pg_engine, account, submitted.job["id"])  # leave nothing held


def test_a_batch_after_a_lost_commit_answer_finds_its_own_jobs(
    pg_engine: Engine, proxied_engine: Engine, pg_proxy: TcpProxy, storage: Storage
) -> None:
    account = new_account(pg_engine)
    grant(pg_engine, account, 10)
    requests = [
        submission_batch.Request(account, dict(SPEC), f"job_lost{i}_{account}", f"lost-{i}")
        for i in range(3)
    ]
    pg_proxy.lose_next_answer(b"COMMIT")  # the account's transaction: its answer is lost
    outcomes = submission_batch.submit_many(proxied_engine, storage, requests)
    assert pg_proxy.answers_lost == 1
    assert [o.job["id"] for o in outcomes if isinstance(o, jobs.Submitted)] == [
        r.job_id for r in requests
    ]
    assert _job_rows(pg_engine, account) == 3
    held = run_transaction(pg_engine, lambda c: ledger.get_balance(c, account, "image"))
    assert held.held == 3 * 2  # each job held once
    for r in requests:
        jobs.cancel(pg_engine, account, r.job_id)  # leave nothing held


def test_a_rejection_after_a_lost_commit_answer_is_recorded_once(
    pg_engine: Engine, proxied_engine: Engine, pg_proxy: TcpProxy, storage: Storage
) -> None:
    account = new_account(pg_engine)  # no credits
    pg_proxy.lose_next_answer(b"COMMIT")  # (a key: the full path, BEGIN ... COMMIT)
    with pytest.raises(jobs.JobRejected):
        jobs.submit(proxied_engine, storage, account, dict(SPEC), idempotency_key="k1")
    assert pg_proxy.answers_lost == 1
    rows = jobs_of(pg_engine, account)
    assert [(r.status, r.idempotency_key) for r in rows] == [(states.REJECTED, None)]


def test_begin_and_finish_after_lost_commit_answers_apply_once(
    pg_engine: Engine, proxied_engine: Engine, pg_proxy: TcpProxy, storage: Storage
) -> None:
    account = new_account(pg_engine)
    grant(pg_engine, account, 10)
    job_id = jobs.submit(pg_engine, storage, account, dict(SPEC)).job["id"]
    # begin's call is a transaction of its own (autocommit): the answer lost is the call's.
    pg_proxy.lose_next_answer(b"tollgate_job_begin")
    attempt = execution.begin(proxied_engine, job_id, "w1")
    assert attempt is not None and attempt.number == 1  # not taken over by its own rerun
    ctx = execution.RunContext(proxied_engine, storage, attempt)
    ctx.deliver(0, b"png-0")
    ctx.deliver(1, b"png-1")
    # So is finish's (the direct connection's autocommit): its answer is the commit's.
    pg_proxy.lose_next_answer(b"tollgate_job_finish")
    status = execution.finish(proxied_engine, attempt, states.SUCCEEDED, ctx=ctx)
    assert pg_proxy.answers_lost == 2
    assert status == states.SUCCEEDED
    job = jobs.get(pg_engine, account, job_id)
    assert (job["charged"], job["refunded"], len(job["outputs"])) == (2, 0, 2)
    results = run_transaction(
        pg_engine,
        lambda c: c.execute(select(job_results).where(job_results.c.job_id == job_id)).all(),
    )
    assert [(r.attempt, r.applied) for r in results] == [(1, True)]
    hold = run_transaction(
        pg_engine, lambda c: c.execute(select(holds).where(holds.c.reference == job_id)).one()
    )
    assert (hold.status, hold.committed) == ("committed", 2)


def test_progress_that_cannot_reach_the_database_keeps_rendering(
    pg_engine: Engine, proxied_engine: Engine, pg_proxy: TcpProxy, storage: Storage
) -> None:
    account = new_account(pg_engine)
    grant(pg_engine, account, 10)
    job_id = jobs.submit(pg_engine, storage, account, dict(SPEC)).job["id"]
    attempt = execution.begin(proxied_engine, job_id, "w1")
    assert attempt is not None
    ctx = execution.RunContext(proxied_engine, storage, attempt)
    pg_proxy.cut()
    ctx.deliver(0, b"png-0")
    ctx._last_write = 0.0  # a write is due
    started = time.monotonic()
    ctx.progress(1, 2)  # fails fast, and the run goes on
    ctx.progress(2, 2)  # within the pause: no database call at all
    assert time.monotonic() - started < 2
    assert ctx.db_faults == 1 and len(ctx.unrecorded) == 1
    restore_after(pg_proxy, 0.5)
    ctx.deliver(1, b"png-1")
    assert execution.finish(proxied_engine, attempt, states.SUCCEEDED, ctx=ctx) == states.SUCCEEDED
    job = jobs.get(pg_engine, account, job_id)
    assert (job["charged"], len(job["outputs"])) == (2, 2)


class Crash(BaseException):
    """Stands for the intake process dying at that point (nothing after it runs)."""


class CrashBeforeDeadLetter(Consumer):
    def _dead_letter(self, message_id: str, fields: Any, detail: Any) -> None:
        raise Crash


def test_a_rejection_replayed_after_an_intake_crash_is_recorded_once(
    pg_engine: Engine, storage: Storage, redis_url: str
) -> None:
    account = new_account(pg_engine)  # no credits: the message is refused
    config = private_config(claim_min_idle_ms=0, claim_interval_s=0.0)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    message_id = xadd(client, config, job_text(account, key="poor-1"))
    base = make_consumer(pg_engine, storage, redis_url, config, name="doomed")
    doomed = CrashBeforeDeadLetter(
        base.engine, base.storage, base.redis, base.publish, name="doomed", config=config
    )
    doomed.ensure_group()
    with pytest.raises(Crash):
        for _ in range(5):
            doomed.step()
    assert [r.status for r in jobs_of(pg_engine, account)] == [states.REJECTED]
    assert pending_count(client, config) == 1  # recorded, not yet dead-lettered nor acked
    survivor = make_consumer(pg_engine, storage, redis_url, config, name="survivor")
    for _ in range(10):
        survivor.step()
        if pending_count(client, config) == 0:
            break
    rows = jobs_of(pg_engine, account)
    assert [r.status for r in rows] == [states.REJECTED]  # one row for one message
    letters = dead_letters(client, config)
    assert [(d["message_id"], d["kind"]) for d in letters] == [(message_id, "insufficient_credits")]
    assert letters[0]["job_id"] == rows[0].id


def test_the_redis_publish_rides_out_a_restart(redis_url: str) -> None:
    proxy = TcpProxy(make_url(redis_url.replace("redis://", "postgresql://")).port or 6379)
    try:
        db = redis_url.rsplit("/", 1)[1]
        client = redis.Redis.from_url(f"redis://127.0.0.1:{proxy.port}/{db}")
        client.ping()
        before = retries("redis")
        proxy.cut()
        restore_after(proxy, 0.5)
        faults.retry_redis(lambda: client.set("tollgate:test:faults", "1"))
        assert client.get("tollgate:test:faults") == b"1"
        assert retries("redis") > before
        proxy.cut()
        with pytest.raises(redis.ConnectionError):
            faults.retry_redis(lambda: client.ping(), budget_s=0.3)
    finally:
        proxy.close()


def test_psycopg_connect_errors_are_transient() -> None:
    # What a cold start against a server that is down raises, through SQLAlchemy.
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    with pytest.raises(DBAPIError) as refused, engine.connect():
        pass
    assert isinstance(refused.value.orig, psycopg.OperationalError)
    assert is_transient(refused.value)
    engine.dispose()
