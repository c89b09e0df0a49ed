"""The API's background nudger (orchestrator.scheduling.nudger): pokes made while a pass
runs are coalesced into the next one, every poked job is relayed exactly once, a failed
pass does not end the thread, and the pending set is bounded."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Engine, select

from billing.db import run_transaction
from orchestrator.jobs import service as jobs
from orchestrator.scheduling import scheduler
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.scheduling.nudger import CHORES_MAX, Nudger
from orchestrator.storage import Storage
from orchestrator.tables import outbox
from tests.intake_helpers import TXT2IMG
from tests.ledger_helpers import grant, new_account


def _unpublished(engine: Engine, job_ids: list[str]) -> int:
    stmt = select(outbox.c.id).where(outbox.c.job_id.in_(job_ids), outbox.c.published_at.is_(None))
    return len(run_transaction(engine, lambda c: c.execute(stmt).all()))


def test_pokes_during_a_pass_are_coalesced_and_each_job_relayed_once(
    pg_engine: Engine, storage: Storage, redis_url: str
) -> None:
    account = new_account(pg_engine)
    grant(pg_engine, account, 20)
    passes: list[list[str]] = []
    first_started, release = threading.Event(), threading.Event()

    def nudge(engine: Engine, publish: Any, ids: list[str]) -> list[str]:
        passes.append(list(ids))
        first_started.set()
        release.wait(10)
        return scheduler.nudge(engine, publish, ids)

    nudger = Nudger(lambda: pg_engine, lambda: Publisher(redis_url), nudge=nudge)
    ids = [jobs.submit(pg_engine, storage, account, TXT2IMG).job["id"] for _ in range(12)]
    nudger.poke(ids[0])
    assert first_started.wait(10)
    for job_id in ids[1:]:  # all while the first pass is blocked
        nudger.poke(job_id)
    release.set()
    assert nudger.flush(10)
    assert passes == [ids[:1], ids[1:]]  # one pass for the eleven pokes made meanwhile
    assert _unpublished(pg_engine, ids) == 0
    nudger.stop()


def test_a_failed_pass_keeps_the_thread_and_a_full_queue_counts_what_it_drops(
    pg_engine: Engine, storage: Storage, redis_url: str
) -> None:
    account = new_account(pg_engine)
    grant(pg_engine, account, 20)
    calls: list[list[str]] = []
    gate = threading.Event()

    def nudge(engine: Engine, publish: Any, ids: list[str]) -> list[str]:
        calls.append(list(ids))
        gate.wait(10)
        if len(calls) == 1:
            raise RuntimeError("the database went away")
        return scheduler.nudge(engine, publish, ids)

    nudger = Nudger(lambda: pg_engine, lambda: Publisher(redis_url), nudge=nudge, pending_max=2)
    ids = [jobs.submit(pg_engine, storage, account, TXT2IMG).job["id"] for _ in range(4)]
    nudger.poke(ids[0])  # this pass fails
    while not calls:
        threading.Event().wait(0.01)
    nudger.poke(ids[1:])  # the first pass still runs: two fit, one is dropped
    gate.set()
    assert nudger.flush(10)
    assert nudger.dropped == 1 and calls == [ids[:1], ids[1:3]]
    assert _unpublished(pg_engine, ids) == 2  # the failed pass's and the dropped one: beat's
    scheduler.nudge(pg_engine, Publisher(redis_url), ids)  # what beat's dispatcher does
    assert _unpublished(pg_engine, ids) == 0
    nudger.stop()
    nudger.poke(ids[0])  # after stop: ignored
    assert nudger.passes == 2


def test_a_relay_only_poke_waits_one_interval_and_joins_a_dispatch_pass() -> None:
    passes: list[tuple[str, list[str]]] = []
    done = threading.Event()

    def nudge(_e: Any, _p: Any, ids: list[str]) -> None:
        passes.append(("dispatch", list(ids)))

    def relay(_e: Any, _p: Any, ids: list[str]) -> None:
        passes.append(("relay", list(ids)))
        done.set()

    nudger = Nudger(lambda: None, lambda: None, nudge=nudge, relay=relay, pass_interval_s=0.5)
    nudger.relay("job_start")  # a job began: its `running` event waits for company
    nudger.poke("job_start")  # it ended within the interval: one pass does both
    assert nudger.flush(10)
    assert passes == [("dispatch", ["job_start"])]
    nudger.relay("job_long")  # a long job: relayed alone, an interval later
    assert done.wait(10) and nudger.flush(10)
    assert passes[1:] == [("relay", ["job_long"])]
    nudger.stop()


def test_deferred_chores_run_on_the_thread_before_the_next_pass_and_are_bounded() -> None:
    order: list[str] = []
    caller = threading.get_ident()
    threads: set[int] = set()

    def nudge(_e: Any, _p: Any, ids: list[str]) -> None:
        order.append(f"pass {ids}")

    def chore(name: str) -> Any:
        def run() -> None:
            threads.add(threading.get_ident())
            order.append(name)
            if name == "broken":
                raise RuntimeError("a metric's store is down")

        return run

    nudger = Nudger(lambda: None, lambda: None, nudge=nudge)
    nudger.defer(chore("broken"))  # a failing chore is logged; the rest still run
    nudger.defer(chore("record run"))
    nudger.poke("job_a")
    assert nudger.flush(10)
    assert order == ["broken", "record run", "pass ['job_a']"]
    assert threads and caller not in threads  # off the caller's thread
    for _ in range(CHORES_MAX + 3):  # no pass meanwhile: the list fills up
        nudger.defer(chore("late"))
    assert nudger.dropped_chores == 3
    nudger.poke("job_b")
    assert nudger.flush(10)
    assert order.count("late") == CHORES_MAX and order[-1] == "pass ['job_b']"
    nudger.stop()
