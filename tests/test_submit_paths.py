"""Submit's two paths give the same effects: PostgreSQL's one statement (hold, job row,
event row, alert lookup, queue entry and flow upsert: orchestrator.jobs.submission_pg) and
the statement-by-statement Python path SQLite runs (scheduler.enqueue included). Same
hold, entries, balances, job row, outbox rows, queue entries, flows, answer and 402; the
ledger verifies clean on both."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, delete, insert, select, text, update

from billing.db import run_transaction
from billing.tables import entries, holds
from billing.verify import verify
from orchestrator.jobs import service as jobs
from orchestrator.jobs.records import view
from orchestrator.scheduling import scheduler
from orchestrator.settlement import alerts
from orchestrator.storage import Storage
from orchestrator.tables import account_limits, dispatch_queue, outbox, sched_flows, sched_queues
from orchestrator.tables import jobs as jobs_table
from tests.ledger_helpers import grant, new_account

SPEC = {"type": "txt2img", "prompt": "paths", "steps": 20, "num_images": 3, "seed": 7}
MOMENTS = ("created_at", "updated_at", "deadline_at")
HOOK_URL = "https://example.com/tollgate-hook"


def _effects(engine: Engine, account: str, job_id: str) -> dict[str, Any]:
    """What one submit left, without ids and clock readings."""

    def work(conn: Connection) -> dict[str, Any]:
        job = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).one()
        hold = conn.execute(select(holds).where(holds.c.reference == job_id)).one()
        moves = conn.execute(
            select(entries.c.type, entries.c.kind, entries.c.delta_balance, entries.c.delta_held)
            .where(entries.c.account_id == account)
            .order_by(entries.c.id)
        ).all()
        messages = conn.execute(
            select(outbox.c.topic, outbox.c.payload)
            .where(outbox.c.job_id == job_id)
            .order_by(outbox.c.id)
        ).all()
        row = job._asdict()
        return {
            "job": {k: v for k, v in row.items() if k not in ("id", "account_id", *MOMENTS)},
            "deadline_s": (job.deadline_at - job.created_at).total_seconds(),
            "hold": (hold.kind, hold.amount, hold.status, hold.committed),
            "hold_ttl_s": (hold.expires_at - hold.created_at).total_seconds(),
            "entries": [tuple(m) for m in moves],
            "outbox": [_message(t, p) for t, p in messages],
            "event_at": [p.get("at") for t, p in messages if t == "event"]
            == [job.updated_at.isoformat()],
            "view": view(job),
            "verify": verify(conn),
        }

    return run_transaction(engine, work)


def _message(topic: str, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if topic == "callback":  # a balance.low webhook: its id and clock readings aside
        data = payload["body"]["data"]
        return topic, {
            "type": payload["body"]["type"],
            "url": payload["url"],
            **{k: data[k] for k in ("kind", "available", "threshold")},
        }
    return topic, {k: v for k, v in payload.items() if k not in ("job_id", "account_id", "at")}


def _submit(
    engine: Engine, storage: Storage, account: str, key: str | None
) -> tuple[str, dict[str, Any]]:
    submitted = jobs.submit(engine, storage, account, dict(SPEC), idempotency_key=key)
    job = submitted.job
    effects = _effects(engine, account, job["id"])
    assert submitted.created
    assert job == effects["view"]  # the answer is the row as stored (defaults included)
    if key is not None:
        again = jobs.submit(engine, storage, account, dict(SPEC), idempotency_key=key)
        assert (again.job["id"], again.created) == (job["id"], False)
    return job["id"], effects


def _normalised(effects: dict[str, Any]) -> dict[str, Any]:
    out = dict(effects)
    out["view"] = {k: v for k, v in effects["view"].items() if k not in ("id", "account_id")}
    for moment in MOMENTS[:2]:
        out["view"].pop(moment, None)
    return out


@pytest.mark.parametrize("key", ["k-1", None])  # None: PostgreSQL's direct statement
def test_postgresql_and_sqlite_submit_alike(
    pg_engine: Engine, sqlite_engine: Engine, storage: Storage, key: str | None
) -> None:
    results = []
    for engine in (pg_engine, sqlite_engine):
        account = new_account(engine)
        grant(engine, account, 2)  # two grants: the hold takes from both
        grant(engine, account, 5)
        # An alert the hold crosses: its balance.low webhook is written in the same commit.
        alerts.set_alerts(engine, account, {"image": 6}, webhook_url=HOOK_URL)
        job_id, effects = _submit(engine, storage, account, key)
        assert [t for t, _ in effects["outbox"]] == ["event", "callback"]
        assert effects["verify"] == []
        with pytest.raises(jobs.JobRejected) as refused:
            jobs.submit(engine, storage, account, {**SPEC, "num_images": 8})
        cause = refused.value.cause
        rejected = _effects_of_rejection(engine, refused.value.job_id)
        jobs.cancel(engine, account, job_id)
        results.append((_normalised(effects), (cause.needed, cause.available), rejected))
    assert results[0] == results[1]


def _effects_of_rejection(engine: Engine, job_id: str) -> dict[str, Any]:
    def work(conn: Connection) -> dict[str, Any]:
        job = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).one()
        hold = conn.execute(select(holds).where(holds.c.reference == job_id)).first()
        return {"status": job.status, "key": job.idempotency_key, "hold": hold}

    return run_transaction(engine, work)


def test_one_statement_stores_what_the_python_path_stores(
    pg_engine: Engine, storage: Storage
) -> None:
    """On PostgreSQL itself, byte for byte: the JSON columns' text, SQL NULLs, the event."""
    account = new_account(pg_engine)
    grant(pg_engine, account, 10)
    fast = jobs.submit(pg_engine, storage, account, dict(SPEC)).job["id"]

    def python_path(conn: Connection) -> str:
        now = jobs.utcnow()
        job_id = jobs.new_job_id()
        stored = conn.execute(select(jobs_table).where(jobs_table.c.id == fast)).one()
        values = jobs._job_values(
            job_id,
            account,
            stored.spec,
            "queued",
            "http",
            now,
            **{
                k: v
                for k, v in stored._asdict().items()
                if k
                in (
                    "credit_kind",
                    "price",
                    "price_per_output",
                    "outputs_expected",
                    "idempotency_key",
                    "request_hash",
                    "callback_url",
                    "webhook_events_filter",
                    "deadline_at",
                )
            },
        )
        jobs._insert_and_hold_py(conn, values, 3600, now)
        alerts.check(conn, account, "image", now, job_id)
        scheduler.enqueue(conn, job_id, "txt2img", account, now, new=True)
        return job_id

    slow = run_transaction(pg_engine, python_path)
    raw = (
        "SELECT spec::text, outputs::text, webhook_events_filter IS NULL,"
        " webhook_events_filter::text, charged, refunded, progress_step, progress_total,"
        " attempt, cancel_requested, error IS NULL, webhook IS NULL, type, status, source"
        " FROM jobs WHERE id = :id"
    )
    event = "SELECT payload::text FROM outbox WHERE job_id = :id AND topic = 'event'"
    with pg_engine.connect() as conn:
        rows = [conn.execute(text(raw), {"id": i}).one() for i in (fast, slow)]
        events = [
            conn.execute(text(event), {"id": i}).scalar_one().replace(i, "ID").split('"at"')[0]
            for i in (fast, slow)
        ]
    assert rows[0] == rows[1]
    assert events[0] == events[1]
    for job_id in (fast, slow):
        jobs.cancel(pg_engine, account, job_id)


QUEUE = "gpu.txt2img"


def _line(conn: Connection, account: str) -> dict[str, Any]:
    """The account's flow on QUEUE and its queue entries, without ids."""
    flow = conn.execute(
        select(sched_flows).where(sched_flows.c.queue == QUEUE, sched_flows.c.account_id == account)
    ).one()
    entries_ = conn.execute(
        select(dispatch_queue)
        .where(dispatch_queue.c.account_id == account)
        .order_by(dispatch_queue.c.id)
    ).all()
    return {
        "flow": {k: v for k, v in flow._asdict().items() if k != "account_id"},
        "entries": [
            {k: v for k, v in e._asdict().items() if k not in ("id", "job_id", "account_id")}
            for e in entries_
        ],
    }


def _enqueue_steps(engine: Engine, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """A new flow, a job joining a backlogged flow, then (both canceled) a new backlog period
    that re-reads an operator's cap override and enters at the flow's finish tag (> V)."""
    account = new_account(engine, "standard")
    grant(engine, account, 50)
    t0 = datetime(2026, 12, 2, 12, 0, 0, 123456, tzinfo=UTC)
    monkeypatch.setattr(jobs, "utcnow", lambda: t0)
    seen = []

    def snapshot() -> None:
        seen.append(run_transaction(engine, lambda c: _line(c, account)))

    first = jobs.submit(engine, storage, account, dict(SPEC)).job["id"]  # creates the flow
    snapshot()
    monkeypatch.setattr(jobs, "utcnow", lambda: t0 + timedelta(seconds=1.5))
    second = jobs.submit(engine, storage, account, dict(SPEC)).job["id"]  # already eligible
    snapshot()
    for job_id in (first, second):
        jobs.cancel(engine, account, job_id)
    snapshot()

    def override(conn: Connection) -> None:  # as an operator leaves it, the flow untouched
        conn.execute(
            insert(account_limits).values(account_id=account, running_cap=3, updated_at=t0)
        )
        conn.execute(
            update(sched_flows)
            .where(sched_flows.c.queue == QUEUE, sched_flows.c.account_id == account)
            .values(finish_tag=7.25)
        )

    run_transaction(engine, override)
    monkeypatch.setattr(jobs, "utcnow", lambda: t0 + timedelta(seconds=4.25))
    third = jobs.submit(engine, storage, account, dict(SPEC)).job["id"]  # a new period
    snapshot()
    jobs.cancel(engine, account, third)
    return seen


def test_enqueue_stores_alike(
    pg_engine: Engine, sqlite_engine: Engine, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = []
    for engine in (pg_engine, sqlite_engine):
        before = run_transaction(
            engine,
            lambda c: (
                c.execute(select(sched_queues.c.vtime).where(sched_queues.c.queue == QUEUE))
                .scalars()
                .first()
            ),
        )

        def set_vtime(conn: Connection, vtime: float | None) -> None:
            conn.execute(delete(sched_queues).where(sched_queues.c.queue == QUEUE))
            if vtime is not None:
                conn.execute(insert(sched_queues).values(queue=QUEUE, vtime=vtime))

        run_transaction(engine, lambda c: set_vtime(c, 3.5))  # the same V on both
        try:
            results.append(_enqueue_steps(engine, storage, monkeypatch))
        finally:
            run_transaction(engine, lambda c, v=before: set_vtime(c, v))
    pg, lite = results
    assert pg == lite
    first, joined, left, period = (r["flow"] for r in pg)
    assert (first["queued"], first["head_tag"], first["eligible"]) == (1, 3.5, True)
    assert (joined["queued"], joined["head_since_s"]) == (2, first["head_since_s"])
    assert (left["queued"], pg[2]["entries"]) == (0, [])
    assert (period["cap"], period["head_tag"]) == (3, 7.25)
    assert [e["state"] for e in pg[1]["entries"]] == ["queued", "queued"]
