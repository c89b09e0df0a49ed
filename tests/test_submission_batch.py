"""A batch submit (orchestrator.jobs.submission_batch, the intake's path) gives each request
exactly what submitting it alone gives: the same rows and ledger effects for new jobs, the
same errors, rejections and replays, and no request changes another's outcome."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from billing import InvalidJobSpec, UnknownAccount
from billing.clock import utcnow
from billing.db import run_transaction
from billing.tables import holds
from billing.verify import verify
from orchestrator.jobs import service as jobs
from orchestrator.jobs import submission_batch as batch
from orchestrator.jobs.submission_batch import Request
from orchestrator.settlement import alerts
from orchestrator.storage import Storage
from orchestrator.tables import dispatch_queue
from orchestrator.tables import jobs as jobs_table
from tests.ledger_helpers import available, grant, new_account
from tests.test_submit_paths import HOOK_URL, SPEC, _effects

PRICE = 3  # SPEC: three images


@pytest.fixture(autouse=True)
def _cancel_afterwards(pg_engine: Engine) -> Iterator[None]:
    """Cancel (and refund) the jobs a test left queued: a later test's worker on the shared
    database would otherwise be dispatched them."""
    started = utcnow()
    yield
    left = run_transaction(
        pg_engine,
        lambda c: c.execute(
            select(jobs_table.c.account_id, jobs_table.c.id).where(
                jobs_table.c.created_at >= started, jobs_table.c.status == "queued"
            )
        ).all(),
    )
    for account, job_id in left:
        jobs.cancel(pg_engine, account, job_id)


def _request(account: str, job_id: str, key: str | None, **spec: Any) -> Request:
    return Request(account, {**SPEC, **spec}, job_id, idempotency_key=key)


def _count(engine: Engine, table: Any, **where: Any) -> int:
    stmt = select(func.count()).select_from(table)
    for column, value in where.items():
        stmt = stmt.where(table.c[column] == value)
    return int(run_transaction(engine, lambda c: c.execute(stmt).scalar_one()))


def _same(effects: dict[str, Any]) -> dict[str, Any]:
    """Effects without the job's id, account and clock readings."""
    view = {k: v for k, v in effects["view"].items() if k not in ("id", "account_id")}
    return {**effects, "view": {k: v for k, v in view.items() if not k.endswith("_at")}}


def test_a_batch_stores_what_each_submit_alone_stores(pg_engine: Engine, storage: Storage) -> None:
    twins = []
    for _ in range(2):
        account = new_account(pg_engine)
        grant(pg_engine, account, 10)
        alerts.set_alerts(pg_engine, account, {"image": 6}, webhook_url=HOOK_URL)
        twins.append(account)
    alone, batched = twins
    jobs.submit(
        pg_engine,
        storage,
        alone,
        dict(SPEC),
        idempotency_key="k-1",
        job_id="job_a1",
        source="redis",
    )
    other = new_account(pg_engine)  # another account in the same batch
    grant(pg_engine, other, 10)
    outcomes = batch.submit_many(
        pg_engine,
        storage,
        [_request(batched, "job_b1", "k-1"), _request(other, "job_b2", "k-1")],
    )
    assert [type(o) for o in outcomes] == [jobs.Submitted, jobs.Submitted]
    assert all(o.created for o in outcomes if isinstance(o, jobs.Submitted))
    assert _same(_effects(pg_engine, batched, "job_b1")) == _same(
        _effects(pg_engine, alone, "job_a1")
    )
    assert available(pg_engine, other) == 10 - PRICE
    assert _count(pg_engine, dispatch_queue, job_id="job_b2") == 1


def test_each_request_keeps_its_own_outcome(pg_engine: Engine, storage: Storage) -> None:
    rich, poor = new_account(pg_engine), new_account(pg_engine)
    grant(pg_engine, rich, 100)
    grant(pg_engine, poor, 1)
    requests = [
        _request(rich, "job_c1", "a"),
        _request(poor, "job_c2", "b"),  # the hold is refused: rejected, as alone
        _request("acct_nobody", "job_c3", "c"),
        _request(rich, "job_c4", "d", steps=-1),  # invalid
        _request(rich, "job_c5", "a"),  # the same key and body again: the first job
        _request(rich, "job_c6", "a", prompt="other"),  # the same key, another body: 409
        _request(rich, "job_c7", None),
    ]
    outcomes = batch.submit_many(pg_engine, storage, requests)

    first, rejected, unknown, invalid, replay, conflict, last = outcomes
    assert isinstance(first, jobs.Submitted) and first.job["id"] == "job_c1"
    assert isinstance(rejected, jobs.JobRejected) and rejected.job_id == "job_c2"
    assert isinstance(unknown, UnknownAccount)
    assert isinstance(invalid, InvalidJobSpec)
    assert isinstance(replay, jobs.Submitted) and replay.job["id"] == "job_c1"
    assert not replay.created
    assert isinstance(conflict, jobs.IdempotencyConflict)
    assert isinstance(last, jobs.Submitted) and last.job["id"] == "job_c7"
    assert available(pg_engine, rich) == 100 - 2 * PRICE
    assert available(pg_engine, poor) == 1
    statuses = run_transaction(
        pg_engine,
        lambda c: dict(
            c.execute(
                select(jobs_table.c.id, jobs_table.c.status).where(
                    jobs_table.c.id.in_([r.job_id for r in requests])
                )
            ).all()
        ),
    )
    assert statuses == {"job_c1": "queued", "job_c2": "rejected", "job_c7": "queued"}
    assert run_transaction(pg_engine, verify) == []


def test_a_replayed_batch_finds_its_jobs_and_holds_nothing_twice(
    pg_engine: Engine, storage: Storage
) -> None:
    account = new_account(pg_engine)
    grant(pg_engine, account, 100)
    requests = [_request(account, f"job_r{i}", f"r{i}" if i % 2 else None) for i in range(5)]
    first = batch.submit_many(pg_engine, storage, requests)
    again = batch.submit_many(pg_engine, storage, requests)

    ids = [o.job["id"] for o in first if isinstance(o, jobs.Submitted)]
    assert ids == [r.job_id for r in requests]
    assert [o.job["id"] for o in again if isinstance(o, jobs.Submitted)] == ids
    assert available(pg_engine, account) == 100 - 5 * PRICE
    assert _count(pg_engine, holds, account_id=account) == 5


@pytest.mark.parametrize("size", [1, batch.BATCH_MAX + 3])
def test_batches_of_any_size_keep_an_accounts_order(
    pg_engine: Engine, storage: Storage, size: int
) -> None:
    accounts = [new_account(pg_engine) for _ in range(3)]
    for account in accounts:
        grant(pg_engine, account, 1000)
    requests = [_request(accounts[i % 3], f"job_o{size}_{i}", f"o{i}") for i in range(size)]
    outcomes = batch.submit_many(pg_engine, storage, requests)

    assert all(isinstance(o, jobs.Submitted) and o.created for o in outcomes)
    for account in accounts:
        ordered = run_transaction(
            pg_engine,
            lambda c, a=account: (
                c.execute(
                    select(dispatch_queue.c.job_id)
                    .where(dispatch_queue.c.account_id == a)
                    .order_by(dispatch_queue.c.id)
                )
                .scalars()
                .all()
            ),
        )
        assert ordered == [r.job_id for r in requests if r.account_id == account]
