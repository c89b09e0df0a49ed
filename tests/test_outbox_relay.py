"""The outbox relay's fast path (`outbox.relay`, `relay_in`): each unpublished row of the
given jobs is published once, in order, and deleted; what a failed publish left stays, as
it was, for the re-publisher; a job moves to `dispatched` only when its dispatch task went
out. The same on PostgreSQL (one claiming statement) and SQLite."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, insert, select

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.jobs import service as jobs
from orchestrator.scheduling import outbox, scheduler, slots
from orchestrator.storage import Storage
from orchestrator.tables import jobs as jobs_table
from orchestrator.tables import outbox as outbox_table
from tests.ledger_helpers import grant, new_account

SPEC = {"type": "txt2img", "prompt": "relay", "steps": 20}


class Recorder:
    """A publisher that records what it sends and fails from the `fail_at`-th message on."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.fail_at = fail_at

    def __call__(self, topic: str, payload: dict[str, Any]) -> None:
        if self.fail_at is not None and len(self.sent) >= self.fail_at:
            raise ConnectionError("redis went away")
        self.sent.append((topic, payload))


def _job_with_messages(engine: Engine, storage: Storage) -> str:
    account = new_account(engine)
    grant(engine, account, 10)
    job_id = str(jobs.submit(engine, storage, account, dict(SPEC)).job["id"])

    def add(conn: Connection) -> None:  # a dispatch task and a second event, unpublished
        for topic, payload in (
            ("dispatch", {"job_id": job_id, "type": "txt2img"}),
            ("event", {"job_id": job_id, "status": "note"}),
        ):
            conn.execute(
                insert(outbox_table).values(
                    topic=topic, job_id=job_id, payload=payload, created_at=utcnow()
                )
            )

    run_transaction(engine, add)
    return job_id


def _rows(engine: Engine, job_id: str) -> list[tuple[Any, ...]]:
    """Every outbox row of the job, sent or not: (id, topic, payload, created_at, published_at)."""
    t = outbox_table.c
    stmt = (
        select(t.id, t.topic, t.payload, t.created_at, t.published_at)
        .where(t.job_id == job_id)
        .order_by(t.id)
    )
    return [tuple(r) for r in run_transaction(engine, lambda c: c.execute(stmt).all())]


def _status(engine: Engine, job_id: str) -> str:
    return str(
        run_transaction(
            engine,
            lambda c: c.execute(
                select(jobs_table.c.status).where(jobs_table.c.id == job_id)
            ).scalar_one(),
        )
    )


def _cancel(engine: Engine, job_id: str) -> None:
    """Leave nothing for a later test's dispatcher on the shared database."""
    account = run_transaction(
        engine,
        lambda c: c.execute(
            select(jobs_table.c.account_id).where(jobs_table.c.id == job_id)
        ).scalar_one(),
    )
    jobs.cancel(engine, account, job_id)


def test_each_row_is_published_once_in_order(any_engine: Engine, storage: Storage) -> None:
    job_id = _job_with_messages(any_engine, storage)
    publish = Recorder()

    assert outbox.relay(any_engine, publish, job_id=job_id) == 3
    assert outbox.relay(any_engine, publish, job_id=[job_id]) == 0  # nothing left

    assert [t for t, _ in publish.sent] == ["event", "dispatch", "event"]
    assert publish.sent[0][1]["status"] == "queued"
    assert _rows(any_engine, job_id) == []  # sent rows are deleted
    assert _status(any_engine, job_id) == "dispatched"
    _cancel(any_engine, job_id)


def test_what_a_failed_publish_left_stays_for_the_re_publisher(
    any_engine: Engine, storage: Storage
) -> None:
    job_id = _job_with_messages(any_engine, storage)
    before = _rows(any_engine, job_id)
    publish = Recorder(fail_at=1)  # the queued event goes out, the dispatch task does not

    assert outbox.relay(any_engine, publish, job_id=job_id) == 1

    assert _rows(any_engine, job_id) == before[1:]  # as they were: ids, payloads, times
    assert [r[1] for r in before[1:]] == ["dispatch", "event"]
    assert _status(any_engine, job_id) == "queued"  # its task never went out
    publish.fail_at = None
    assert outbox.relay(any_engine, publish, job_id=job_id) == 2
    assert [t for t, _ in publish.sent] == ["event", "dispatch", "event"]
    assert [p for _, p in publish.sent] == [r[2] for r in before]
    assert _status(any_engine, job_id) == "dispatched"
    assert _rows(any_engine, job_id) == []
    _cancel(any_engine, job_id)


class HalfPublisher:
    """A nudge's publisher (with `many` and `redis`) whose Redis fails after `sends` tasks."""

    def __init__(self, redis: Any, sends: int) -> None:
        self.redis = redis
        self.sends = sends
        self.sent: list[dict[str, Any]] = []

    def many(self, messages: list[tuple[str, dict[str, Any]]]) -> int:
        done = messages[: max(0, self.sends - len(self.sent))]
        self.sent += [payload for _, payload in done]
        return len(done)

    def __call__(self, topic: str, payload: dict[str, Any]) -> None:
        raise ConnectionError("redis went away")


def test_a_nudge_writes_outbox_rows_only_for_the_tasks_it_could_not_send(
    pg_engine: Engine, storage: Storage, private_redis: Any
) -> None:
    worker = slots.WorkerSlots("announced-relay", ("gpu.txt2img",), 8)
    slots.announce(private_redis, worker, ttl_s=120)
    account = new_account(pg_engine, "business")  # (a free account runs 2 at a time)
    grant(pg_engine, account, 10)
    mine = [str(jobs.submit(pg_engine, storage, account, dict(SPEC)).job["id"]) for _ in range(3)]
    for job_id in mine:  # the queued events: sent and gone
        outbox.relay(pg_engine, Recorder(), job_id=job_id)
    publish = HalfPublisher(private_redis, sends=1)
    try:
        dispatched = scheduler.nudge(pg_engine, publish)
        sent = {p["job_id"] for p in publish.sent}
        picked = [j for j in mine if j in dispatched]
        assert len(picked) == 3 and len(sent) == 1  # (any earlier test's job may be picked too)
        for job_id in picked:
            topics = [r[1] for r in _rows(pg_engine, job_id)]
            assert topics == ([] if job_id in sent else ["dispatch"]), job_id
            assert _status(pg_engine, job_id) == "dispatched"
        unsent = [j for j in picked if j not in sent]
        assert len(unsent) >= 2
        recorder = Recorder()
        assert outbox.relay(pg_engine, recorder, job_id=unsent) == len(unsent)  # re-publisher
        assert sorted(p["job_id"] for _, p in recorder.sent) == sorted(unsent)
        assert all(_rows(pg_engine, j) == [] for j in mine)
    finally:
        slots.withdraw(private_redis, worker)
        for job_id in mine:
            _cancel(pg_engine, job_id)
