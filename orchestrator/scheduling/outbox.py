"""Transactional outbox. `add` writes a message in the caller's transaction; `relay` publishes
unpublished messages after commit: right away for the job just changed (fast path), and from
Celery beat for anything a crash left behind. Publishing is at least once: consumers
(workers, event readers, callback receivers) tolerate duplicates."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, Engine, delete, insert, select, update

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.db import commit_without_flush_wait
from orchestrator.tables import jobs, outbox

log = logging.getLogger(__name__)

TOPICS: Final = ("dispatch", "event", "callback")
RELAY_BATCH_MAX: Final = 200
# Sent rows are deleted once they are this old (nothing reads a sent row; the hour leaves
# them to look at while debugging), by beat's re-publisher, in batches of PRUNE_BATCH_MAX,
# at most PRUNE_BATCHES_MAX a run (every 5 s: up to 4,000 rows/s, about 1,000 jobs/s).
PRUNE_AFTER_S: Final = 3600.0
PRUNE_BATCH_MAX: Final = 2000
PRUNE_BATCHES_MAX: Final = 10
# The fast path on PostgreSQL, as plain driver SQL (pyformat, as psycopg takes it): ONE
# statement claims a job's unpublished rows and marks them published (its transaction then
# publishes them, and takes the marks of any it could not send back before COMMIT: a crash
# before COMMIT undoes every mark). It also lets the COMMIT skip the WAL flush wait: a
# mark lost to a server crash only means sending the message again.
PG_CLAIM_SQL: Final = (
    "WITH picked AS (SELECT id FROM outbox WHERE published_at IS NULL"
    " AND job_id = ANY(%(jobs)s) ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED),"
    " marked AS (UPDATE outbox AS o SET published_at = %(now)s FROM picked"
    " WHERE o.id = picked.id RETURNING o.id, o.topic, o.job_id, o.payload),"
    " relaxed AS (SELECT set_config('synchronous_commit', 'off', true) AS v)"
    " SELECT marked.* FROM marked, relaxed ORDER BY marked.id"
)
PG_UNMARK_SQL: Final = "UPDATE outbox SET published_at = NULL WHERE id = ANY(%(ids)s)"
# Jobs whose dispatch task went out move from `queued` to `dispatched`.
PG_MOVE_SQL: Final = (
    "UPDATE jobs SET status = 'dispatched', updated_at = %(now)s"
    " WHERE id = ANY(%(dispatched)s) AND status = 'queued'"
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
    one fixed statement claims and marks them (PG_CLAIM_SQL)."""
    if conn.dialect.name == "postgresql":
        return _relay_in_pg(conn, publish, job_ids, limit)
    rows = conn.execute(
        select(outbox)
        .where(outbox.c.published_at.is_(None), outbox.c.job_id.in_(job_ids))
        .order_by(outbox.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    sent = publish_rows(publish, rows)
    if sent:
        mark_sent(conn, sent, utcnow())
    return len(sent)


def _relay_in_pg(conn: Connection, publish: Publisher, job_ids: Sequence[str], limit: int) -> int:
    now = utcnow().astimezone(UTC).replace(tzinfo=None)  # naive UTC, as the columns store
    params = {"jobs": list(job_ids), "limit": limit, "now": now}
    rows = conn.exec_driver_sql(PG_CLAIM_SQL, params).all()
    if not rows:
        return 0
    sent = publish_rows(publish, rows)
    if len(sent) < len(rows):
        conn.exec_driver_sql(PG_UNMARK_SQL, {"ids": [r.id for r in rows[len(sent) :]]})
    dispatched = sorted({r.job_id for r in sent if r.topic == "dispatch"})
    if dispatched:
        conn.exec_driver_sql(PG_MOVE_SQL, {"now": now, "dispatched": dispatched})
    return len(sent)


def relay_quietly(engine: Engine, publish: Publisher, job_id: str | list[str]) -> None:
    """The fast path after a commit: failures are left for the beat re-publisher."""
    try:
        relay(engine, publish, job_id=job_id)
    except Exception:
        log.warning(
            "outbox fast path failed for %s; the re-publisher will retry", job_id, exc_info=True
        )


def prune(
    engine: Engine,
    now: datetime | None = None,
    after_s: float = PRUNE_AFTER_S,
    batch_max: int = PRUNE_BATCH_MAX,
    batches_max: int = PRUNE_BATCHES_MAX,
) -> int:
    """Delete rows sent more than `after_s` ago, oldest first: at most `batches_max`
    transactions of at most `batch_max` rows (the table would otherwise keep every message
    ever sent, about four per job). Returns the rows deleted. A delete lost to a crash is
    redone by the next run, so its commits skip the WAL flush wait."""
    cutoff = (now or utcnow()) - timedelta(seconds=after_s)
    oldest = (
        select(outbox.c.id)
        .where(outbox.c.published_at.is_not(None), outbox.c.published_at < cutoff)
        .order_by(outbox.c.published_at)
        .limit(batch_max)
    )

    def batch(conn: Connection) -> int:
        commit_without_flush_wait(conn)
        return int(conn.execute(delete(outbox).where(outbox.c.id.in_(oldest))).rowcount or 0)

    deleted = 0
    for _ in range(max(1, batches_max)):
        n = run_transaction(engine, batch)
        deleted += n
        if n < batch_max:
            break
    return deleted
