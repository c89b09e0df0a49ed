"""A dispatch decision's writes, in the dispatcher's transaction: on PostgreSQL one fixed
statement of data-modifying CTEs over arrays (written once: nothing is built or compiled
per call, and psycopg prepares it like any other), on SQLite statement by statement.
tests/test_scheduler_release.py checks both leave the same rows."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Connection, insert, update
from sqlalchemy.engine import Row

from orchestrator.scheduling.decision import FLOW_WRITE
from orchestrator.scheduling.flows import DISPATCHED, QUEUED
from orchestrator.tables import dispatch_queue, jobs, outbox, sched_queues

# The decision's writes on PostgreSQL: one statement of data-modifying CTEs over arrays,
# written once (no statement built or compiled per call; psycopg prepares it like any
# other): the flows' new rows, the queues' virtual times, the entries and jobs marked
# dispatched, and their outbox rows (in pick order). The relaxed form (the nudge, which
# publishes in the transaction) also lets the COMMIT skip the WAL flush wait.
_WRITE_CTES: Final = (
    "WITH fw AS (UPDATE sched_flows AS f SET running = w.running, queued = w.queued,"
    " finish_tag = w.finish_tag, head_tag = w.head_tag, head_since_s = w.head_since_s,"
    " sort_key = w.sort_key, eligible = w.eligible"
    " FROM unnest(%(f_queue)s::text[], %(f_account)s::text[], %(f_running)s::int[],"
    " %(f_queued)s::int[], %(f_finish)s::float8[], %(f_head)s::float8[],"
    " %(f_since)s::float8[], %(f_key)s::float8[], %(f_eligible)s::bool[])"
    " AS w(queue, account_id, running, queued, finish_tag, head_tag, head_since_s,"
    " sort_key, eligible)"
    " WHERE f.queue = w.queue AND f.account_id = w.account_id),"
    " vw AS (UPDATE sched_queues AS q SET vtime = w.vtime"
    " FROM unnest(%(v_queue)s::text[], %(v_time)s::float8[]) AS w(queue, vtime)"
    " WHERE q.queue = w.queue),"
    " dq AS (UPDATE dispatch_queue SET state = 'dispatched', dispatched_at = %(now)s"
    " WHERE id = ANY(%(entries)s::bigint[])),"
    " jb AS (UPDATE jobs SET status = 'dispatched', updated_at = %(now)s"
    " WHERE id = ANY(%(jobs)s::text[]) AND status = 'queued'),"
    " ob AS (INSERT INTO outbox (topic, job_id, payload, created_at, published_at)"
    " SELECT 'dispatch', m.job_id, m.payload::json, %(now)s, %(published)s::timestamp"
    " FROM unnest(%(jobs)s::text[], %(payloads)s::text[]) WITH ORDINALITY"
    " AS m(job_id, payload, n) ORDER BY m.n)"
)
WRITE_SQL: Final = _WRITE_CTES + " SELECT 1"
WRITE_RELAXED_SQL: Final = _WRITE_CTES + " SELECT set_config('synchronous_commit', 'off', true)"


def write_params(
    now: datetime,
    taken_rows: list[Row[Any]],
    flow_writes: list[dict[str, Any]],
    vtimes: list[dict[str, Any]],
    *,
    published: bool,
) -> dict[str, Any]:
    naive = now.astimezone(UTC).replace(tzinfo=None)  # naive UTC, as the columns store
    return {
        "f_queue": [w["b_queue"] for w in flow_writes],
        "f_account": [w["b_account"] for w in flow_writes],
        "f_running": [w["b_running"] for w in flow_writes],
        "f_queued": [w["b_queued"] for w in flow_writes],
        "f_finish": [float(w["b_finish"]) for w in flow_writes],
        "f_head": [float(w["b_head"]) for w in flow_writes],
        "f_since": [float(w["b_since"]) for w in flow_writes],
        "f_key": [float(w["b_key"]) for w in flow_writes],
        "f_eligible": [bool(w["b_eligible"]) for w in flow_writes],
        "v_queue": [v["b_queue"] for v in vtimes],
        "v_time": [float(v["b_vtime"]) for v in vtimes],
        "now": naive,
        "entries": [t.id for t in taken_rows],
        "jobs": [t.job_id for t in taken_rows],
        "payloads": [json.dumps({"job_id": t.job_id, "type": t.task}) for t in taken_rows],
        "published": naive if published else None,
    }


def write_in_steps(
    conn: Connection,
    now: datetime,
    taken_rows: list[Row[Any]],
    flow_writes: list[dict[str, Any]],
    vtimes: list[dict[str, Any]],
    *,
    published: bool,
) -> None:
    """The decision's writes statement by statement (SQLite)."""
    if flow_writes:
        conn.execute(FLOW_WRITE, flow_writes)
    for v in vtimes:
        conn.execute(
            update(sched_queues)
            .where(sched_queues.c.queue == v["b_queue"])
            .values(vtime=v["b_vtime"])
        )
    conn.execute(
        update(dispatch_queue)
        .where(dispatch_queue.c.id.in_([t.id for t in taken_rows]))
        .values(state=DISPATCHED, dispatched_at=now)
    )
    conn.execute(
        update(jobs)
        .where(jobs.c.id.in_([t.job_id for t in taken_rows]), jobs.c.status == QUEUED)
        .values(status=DISPATCHED, updated_at=now)
    )
    conn.execute(
        insert(outbox),
        [
            {
                "topic": "dispatch",
                "job_id": t.job_id,
                "payload": {"job_id": t.job_id, "type": t.task},
                "created_at": now,
                "published_at": now if published else None,  # un-marked later if unsent
            }
            for t in taken_rows
        ],
    )
