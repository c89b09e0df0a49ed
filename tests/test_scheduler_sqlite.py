"""The scheduler's SQL side on the embedded default (SQLite): fair order 4:1 between a
standard and a free account, caps, FIFO, cancel leaving the line, and the flow counters
agreeing with the rows after each step. (PostgreSQL: tests/test_scheduling_e2e.py.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from billing.db import run_transaction
from orchestrator.jobs import service as jobs
from orchestrator.jobs.records import lock_job
from orchestrator.scheduling import slots
from orchestrator.scheduling.queues import position
from orchestrator.scheduling.scheduler import dispatch_once
from orchestrator.settlement.settle import settle
from orchestrator.storage import Storage
from orchestrator.tables import dispatch_queue, sched_flows
from tests.ledger_helpers import grant, new_account

SPEC = {"type": "txt2img", "prompt": "p", "steps": 20}


@pytest.fixture
def two_slots(private_redis: Any) -> Iterator[Any]:
    # A database of its own: only this fake worker's slots, no run-time estimate (so the
    # base buffer, 1 per worker).
    client = private_redis
    fake = slots.WorkerSlots("sqlite-test", ("gpu.txt2img",), 4)
    slots.announce(client, fake, ttl_s=120)
    yield client
    slots.withdraw(client, fake)


def _submit(engine: Engine, storage: Storage, acc: str, n: int) -> list[str]:
    return [str(jobs.submit(engine, storage, acc, SPEC).job["id"]) for _ in range(n)]


def _finish(engine: Engine, job_ids: list[str]) -> None:
    from billing.clock import utcnow

    for job_id in job_ids:
        run_transaction(
            engine, lambda c, j=job_id: settle(c, lock_job(c, j), "succeeded", 1, utcnow())
        )


def _check_counters(engine: Engine) -> None:
    def work(conn: Any) -> None:
        real = Counter(
            {
                (q, a, s): n
                for q, a, s, n in conn.execute(
                    select(
                        dispatch_queue.c.queue,
                        dispatch_queue.c.account_id,
                        dispatch_queue.c.state,
                        func.count(),
                    ).group_by(
                        dispatch_queue.c.queue, dispatch_queue.c.account_id, dispatch_queue.c.state
                    )
                )
            }
        )
        for f in conn.execute(select(sched_flows)):
            assert f.queued == real[(f.queue, f.account_id, "queued")], f
            assert f.running == real[(f.queue, f.account_id, "dispatched")], f
            assert f.eligible == (f.queued > 0 and f.running < f.cap), f

    run_transaction(engine, work)


def test_fair_order_caps_and_cancel_on_sqlite(
    sqlite_engine: Engine, storage: Storage, settings_env: None, two_slots: Any
) -> None:
    engine = sqlite_engine
    free, std = new_account(engine, "free"), new_account(engine, "standard")
    grant(engine, free, 100)
    grant(engine, std, 100)
    free_ids = _submit(engine, storage, free, 10)
    std_ids = _submit(engine, storage, std, 10)
    _check_counters(engine)
    place = run_transaction(engine, lambda c: position(c, std_ids[3]))
    assert place is not None and place["position"] >= 3

    sent = dispatch_once(engine, two_slots)  # 4 slots + 1 buffer
    assert len(sent) == 5
    # free's cap is 2; the standard account's weight gets it the rest, oldest first.
    assert [j for j in sent if j in std_ids] == std_ids[: len([j for j in sent if j in std_ids])]
    assert len([j for j in sent if j in free_ids]) <= 2
    assert dispatch_once(engine, two_slots) == []  # no free slot until one ends
    _check_counters(engine)

    jobs.cancel(engine, free, free_ids[-1])  # queued: refunded, out of the line
    _finish(engine, sent)
    _check_counters(engine)
    completed = Counter("std" if j in std_ids else "free" for j in sent)
    while True:  # drain, finishing each batch, counting the order of dispatch
        batch = dispatch_once(engine, two_slots)
        if not batch:
            break
        completed.update("std" if j in std_ids else "free" for j in batch)
        if sum(completed.values()) <= 10:
            assert completed["std"] >= 3 * completed["free"] - 2, completed
        _finish(engine, batch)
        _check_counters(engine)
    assert completed == {"std": 10, "free": 9}
    statuses = {jobs.get(engine, None, j)["status"] for j in free_ids[:-1] + std_ids}
    assert statuses == {"succeeded"}


def test_a_worker_on_two_queues_shares_its_slots(
    sqlite_engine: Engine, storage: Storage, settings_env: None, private_redis: Any
) -> None:
    from tests.test_scheduling_e2e import _png

    engine = sqlite_engine
    client = private_redis  # only this worker's slots; no run-time estimate: the base buffer
    both = slots.WorkerSlots("sqlite-both", ("gpu.post", "gpu.txt2img"), 2)
    slots.announce(client, both, ttl_s=120)
    try:
        acc = new_account(engine, "business")
        grant(engine, acc, 100)
        txt = _submit(engine, storage, acc, 4)
        post = [
            str(
                jobs.submit(
                    engine, storage, acc, {"type": "remove_background", "image_b64": _png()}
                ).job["id"]
            )
            for _ in range(4)
        ]
        sent = dispatch_once(engine, client)
        assert len(sent) == 3  # 2 processes + 1 buffer for both queues, not 3 for each
        assert {j in post for j in sent} == {True, False}  # the longer-waiting heads first
        assert dispatch_once(engine, client) == []
        _finish(engine, sent[:1])
        assert len(dispatch_once(engine, client)) == 1
        _check_counters(engine)
    finally:
        slots.withdraw(client, both)
        for j in txt + post:
            if jobs.get(engine, None, j)["status"] != "succeeded":
                jobs.cancel(engine, None, j)
