"""The outbox relay's fast path (`outbox.relay`, `relay_in`): each unpublished row of the
given jobs is published once, in order; what a failed publish left is unmarked for the
re-publisher; a job moves to `dispatched` only when its dispatch task went out. The same on
PostgreSQL (one claiming statement) and SQLite."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, Engine, insert, select

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.jobs import service as jobs
from orchestrator.scheduling import outbox
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


def _unpublished(engine: Engine, job_id: str) -> list[str]:
    return list(
        run_transaction(
            engine,
            lambda c: (
                c.execute(
                    select(outbox_table.c.topic)
                    .where(outbox_table.c.job_id == job_id, outbox_table.c.published_at.is_(None))
                    .order_by(outbox_table.c.id)
                )
                .scalars()
                .all()
            ),
        )
    )


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
    assert _unpublished(any_engine, job_id) == []
    assert _status(any_engine, job_id) == "dispatched"
    _cancel(any_engine, job_id)


def test_what_a_failed_publish_left_stays_for_the_re_publisher(
    any_engine: Engine, storage: Storage
) -> None:
    job_id = _job_with_messages(any_engine, storage)
    publish = Recorder(fail_at=1)  # the queued event goes out, the dispatch task does not

    assert outbox.relay(any_engine, publish, job_id=job_id) == 1

    assert _unpublished(any_engine, job_id) == ["dispatch", "event"]
    assert _status(any_engine, job_id) == "queued"  # its task never went out
    publish.fail_at = None
    assert outbox.relay(any_engine, publish, job_id=job_id) == 2
    assert [t for t, _ in publish.sent] == ["event", "dispatch", "event"]
    assert _status(any_engine, job_id) == "dispatched"
    _cancel(any_engine, job_id)


def _rows(engine: Engine, job_id: str) -> list[tuple[str, bool]]:
    return [
        (r.topic, r.published_at is not None)
        for r in run_transaction(
            engine,
            lambda c: c.execute(
                select(outbox_table.c.topic, outbox_table.c.published_at)
                .where(outbox_table.c.job_id == job_id)
                .order_by(outbox_table.c.id)
            ).all(),
        )
    ]


def test_prune_deletes_rows_sent_long_ago_in_bounded_batches(
    any_engine: Engine, storage: Storage
) -> None:
    job_id = _job_with_messages(any_engine, storage)
    outbox.relay(any_engine, Recorder(), job_id=job_id)  # all three sent now
    _cancel(any_engine, job_id)  # its `canceled` event: unsent
    assert _rows(any_engine, job_id) == [
        ("event", True),
        ("dispatch", True),
        ("event", True),
        ("event", False),
    ]
    later = utcnow() + timedelta(seconds=outbox.PRUNE_AFTER_S + 60)
    outbox.prune(any_engine)  # sent a moment ago: kept
    assert len(_rows(any_engine, job_id)) == 4
    # An hour on: sent rows go, oldest first, at most batches x batch a run (on a shared
    # database other tests' sent rows count too: three are surely ours).
    assert outbox.prune(any_engine, now=later, batch_max=1, batches_max=2) == 2
    while outbox.prune(any_engine, now=later, batch_max=500) >= 500:
        pass
    assert _rows(any_engine, job_id) == [("event", False)]  # never an unsent row
