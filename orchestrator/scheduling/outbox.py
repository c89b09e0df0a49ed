"""Transactional outbox. `add` writes a message in the caller's transaction; `relay` publishes
unpublished messages after commit: right away for the job just changed (fast path), and from
Celery beat for anything a crash left behind. Publishing is at least once: consumers
(workers, event readers, callback receivers) tolerate duplicates."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, Engine, insert, select, update

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.db import commit_without_flush_wait
from orchestrator.tables import jobs, outbox

log = logging.getLogger(__name__)

TOPICS: Final = ("dispatch", "event", "callback")
RELAY_BATCH_MAX: Final = 200
# The fast path's statements on PostgreSQL, as plain driver SQL (pyformat, as psycopg takes
# it): no statement building per call. Marking the rows, moving dispatched jobs on and
# letting the commit skip the WAL flush wait is one statement (data-modifying CTEs always
# run; the setting applies to this transaction's COMMIT).
PG_PICK_SQL: Final = (
    "SELECT id, topic, job_id, payload FROM outbox WHERE published_at IS NULL"
    " AND job_id = ANY(%(jobs)s) ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
)
PG_MARK_SQL: Final = (
    "WITH marked AS (UPDATE outbox SET published_at = %(now)s WHERE id = ANY(%(ids)s)),"
    " moved AS (UPDATE jobs SET status = 'dispatched', updated_at = %(now)s"
    " WHERE id = ANY(%(dispatched)s) AND status = 'queued')"
    " SELECT set_config('synchronous_commit', 'off', true)"
)

Publisher = Callable[[str, dict[str, Any]], None]


def publish_rows(publish: Publisher, rows: Sequence[Any]) -> list[Any]:
    """Publish outbox `rows` in order; the ones sent before the first failure (logged: the
    rest stay unpublished for the re-publisher). A publisher with `many` (dispatch.Publisher)
    sends consecutive events in one round trip."""
    many = getattr(publish, "many", None)
    if many is not None:
        return list(rows[: many([(r.topic, r.payload) for r in rows])])
    sent = []
    for row in rows:
        try:
            publish(row.topic, row.payload)
        except Exception:
            log.warning("outbox publish failed; the re-publisher will send it", exc_info=True)
            break
        sent.append(row)
    return sent


INSERT_MESSAGE: Final = insert(outbox)  # built once: every submit writes one


def add(conn: Connection, topic: str, job_id: str | None, payload: dict[str, Any]) -> None:
    assert topic in TOPICS, topic
    conn.execute(
        INSERT_MESSAGE,
        {"topic": topic, "job_id": job_id, "payload": payload, "created_at": utcnow()},
    )


def add_many(conn: Connection, job_id: str | None, messages: list[tuple[str, Any]]) -> None:
    """Several messages for one job in one statement, in order."""
    assert all(topic in TOPICS for topic, _ in messages), messages
    now = utcnow()
    conn.execute(
        insert(outbox),
        [
            {"topic": topic, "job_id": job_id, "payload": payload, "created_at": now}
            for topic, payload in messages
        ],
    )


def relay(
    engine: Engine,
    publish: Publisher,
    *,
    job_id: str | list[str] | None = None,
    min_age_s: float = 0.0,
    limit: int = RELAY_BATCH_MAX,
) -> int:
    """Publish up to `limit` unpublished messages (one job's or some jobs', or all older
    than `min_age_s`).
    Rows are locked (SKIP LOCKED on PostgreSQL) so concurrent relays never double-send a
    message they can see is taken; a crash after publish but before commit re-sends it."""

    def work(conn: Connection) -> int:
        if job_id is not None and not min_age_s and conn.dialect.name == "postgresql":
            return relay_in(conn, publish, [job_id] if isinstance(job_id, str) else job_id, limit)
        stmt = select(outbox).where(outbox.c.published_at.is_(None)).order_by(outbox.c.id)
        if isinstance(job_id, str):
            stmt = stmt.where(outbox.c.job_id == job_id)
        elif job_id is not None:
            stmt = stmt.where(outbox.c.job_id.in_(job_id))
        if min_age_s:
            stmt = stmt.where(outbox.c.created_at <= utcnow() - timedelta(seconds=min_age_s))
        rows = conn.execute(stmt.limit(limit).with_for_update(skip_locked=True)).all()
        if not rows:
            return 0
        # Losing these marks to a crash only means publishing the messages again.
        commit_without_flush_wait(conn)
        now = utcnow()
        sent = publish_rows(publish, rows)
        if sent:
            mark_sent(conn, sent, now)
        return len(sent)

    return run_transaction(engine, work)


def mark_sent(conn: Connection, rows: Sequence[Any], now: datetime) -> None:
    """Mark outbox `rows` (with `id`, `topic`, `job_id`) published, and move the jobs whose
    dispatch task was among them from `queued` to `dispatched`."""
    conn.execute(
        update(outbox).where(outbox.c.id.in_([r.id for r in rows])).values(published_at=now)
    )
    dispatched = sorted({r.job_id for r in rows if r.topic == "dispatch"})
    if dispatched:
        conn.execute(
            update(jobs)
            .where(jobs.c.id.in_(dispatched), jobs.c.status == "queued")
            .values(status="dispatched", updated_at=now)
        )


def relay_in(
    conn: Connection, publish: Publisher, job_ids: Sequence[str], limit: int = RELAY_BATCH_MAX
) -> int:
    """Publish `job_ids`' unpublished rows in the caller's transaction (the relay's fast
    path, and the dispatch transaction's); how many were marked published. On PostgreSQL
    two fixed statements, the mark also letting the COMMIT skip the WAL flush wait."""
    pg = conn.dialect.name == "postgresql"
    if pg:
        rows = conn.exec_driver_sql(PG_PICK_SQL, {"jobs": list(job_ids), "limit": limit}).all()
    else:
        rows = conn.execute(
            select(outbox)
            .where(outbox.c.published_at.is_(None), outbox.c.job_id.in_(job_ids))
            .order_by(outbox.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
    sent = publish_rows(publish, rows)
    if sent:
        (mark_sent_pg if pg else mark_sent)(conn, sent, utcnow())
    return len(sent)


def mark_sent_pg(conn: Connection, rows: Sequence[Any], now: datetime) -> None:
    """`mark_sent` on PostgreSQL in one fixed statement, which also lets this transaction's
    COMMIT skip the WAL flush wait (published marks are safe to lose)."""
    dispatched = sorted({r.job_id for r in rows if r.topic == "dispatch"})
    naive = now.astimezone(UTC).replace(tzinfo=None)  # naive UTC, as the columns store
    conn.exec_driver_sql(
        PG_MARK_SQL, {"now": naive, "ids": [r.id for r in rows], "dispatched": dispatched}
    )


def relay_quietly(engine: Engine, publish: Publisher, job_id: str | list[str]) -> None:
    """The fast path after a commit: failures are left for the beat re-publisher."""
    try:
        relay(engine, publish, job_id=job_id)
    except Exception:
        log.warning(
            "outbox fast path failed for %s; the re-publisher will retry", job_id, exc_info=True
        )
