"""Submit's PostgreSQL fast path: the hold, the job row, its `event` outbox row, the alert
lookup and the scheduler's enqueue (the `dispatch_queue` entry and the flow upsert) in ONE
statement: the submit transaction is BEGIN, this statement, COMMIT.

The statement calls the ledger's own `tollgate_ledger_hold` (migration 0003: the balance
lock, grant expiry, burn order, allocations and entries, exactly as `billing.ledger.hold`),
then inserts the job and its outbox row only when the hold succeeded, and says whether the
account has a low-balance alert for the kind (the job service runs `alerts.check` only
then). It runs inside the job service's submit transaction, so the hold and the job still
commit together, durably, or not at all; a hold error comes back as a code and is raised as
the Python path's exception (billing.ledger_pg.hold_result), which rolls that transaction
back. SQLite keeps the Python path (orchestrator.jobs.service._insert_and_hold_py);
tests/test_submit_paths.py checks both store the same rows and ledger effects.

The alert lookup reads the statement's snapshot, taken before the hold waits for the balance
lock: an alert that `alerts.set_alerts` commits during that wait is not seen by this hold
(its webhook fires at the account's next credit change, which runs `alerts.check`).

The enqueue (`ENQUEUE_CTES`) is `scheduler.enqueue(..., new=True)`: the `queued` entry, then
the upsert of the (queue, account) flow with exactly the arithmetic of
`orchestrator.scheduling.flows.joined` (`_joined_stmt`, `_changes(1, 0, refresh=True)`): a new
flow starts at the queue's virtual time; a new backlog period (queued was 0) re-reads the
plan's weight and the cap (an operator's override first); a flow that becomes eligible
enters at max(V, finish tag) as of now. `ON CONFLICT DO UPDATE` works on the flow's latest
row version, under its row lock, as the separate statement did. The plan, the limits and
the virtual time are read in the statement's snapshot (taken before the balance lock
wait, so a dispatch committed during that wait is not seen: the flow may enter at a
slightly older V, as if the submit had come a moment earlier). Families with their own
rows after the hold (`Kind.after_hold`: tunes) keep `scheduler.enqueue` after them.
"""

from __future__ import annotations

from collections import namedtuple
from datetime import UTC, datetime
from typing import Any, Final, cast

from psycopg.types.json import Json
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError

from billing.db import is_retryable
from billing.ledger_pg import HOLD_COLUMNS, hold_result
from orchestrator.db_direct import run_statement
from orchestrator.scheduling.flows import PLANS, QUEUED, settings_params
from orchestrator.settings import get_settings
from orchestrator.tables import jobs

# The job columns submit writes; the others take their server defaults (SERVER_DEFAULTS,
# or NULL), which the returned row carries without reading them back.
INSERTED: Final = (
    "id",
    "account_id",
    "type",
    "spec",
    "status",
    "credit_kind",
    "price",
    "price_per_output",
    "outputs_expected",
    "outputs",
    "idempotency_key",
    "request_hash",
    "callback_url",
    "webhook_events_filter",
    "source",
    "attempt",
    "deadline_at",
    "created_at",
    "updated_at",
)
SERVER_DEFAULTS: Final[dict[str, Any]] = {
    "charged": 0,
    "refunded": 0,
    "progress_step": 0,
    "progress_total": 0,
    "cancel_requested": False,
}
JSON_PARAMS: Final = ("spec", "outputs", "webhook_events_filter")
TIME_PARAMS: Final = ("deadline_at", "created_at", "updated_at")
# A job row as the statement inserted it: read by attribute, like a result Row.
JobRow = namedtuple("JobRow", [c.name for c in jobs.c])  # type: ignore[misc]

_VALUES: Final = ", ".join(
    f"%({name})s::json" if name in JSON_PARAMS else f"%({name})s" for name in INSERTED
)
# Plain driver SQL (pyformat, as psycopg takes it): no SQLAlchemy statement compiling, bind
# or result processing per call. Timestamps go in as naive UTC, as the tables store them.
_HOLD_AND_INSERT: Final = f"""
WITH h AS (
    SELECT {", ".join(HOLD_COLUMNS)} FROM tollgate_ledger_hold(
        %(account_id)s::text, %(credit_kind)s::text, %(price)s::bigint, %(id)s::text,
        %(ttl_s)s::integer, %(now)s::timestamp)
), j AS (
    INSERT INTO jobs ({", ".join(INSERTED)})
    SELECT {_VALUES} FROM h WHERE h.r_error IS NULL
    RETURNING id
), o AS (
    INSERT INTO outbox (topic, job_id, payload, created_at)
    SELECT 'event', j.id, %(payload)s::json, %(now)s FROM j
)"""


def _by_plan(prefix: str, cast: str) -> str:
    """flows._limits_exprs' CASE on the plan, over the plans' parameters."""
    whens = " ".join(f"WHEN '{p}' THEN %(b_{prefix}_{p})s::{cast}" for p in PLANS)
    return f"CASE s.plan {whens} ELSE %(b_{prefix}_free)s::{cast} END"


# flows._joined_stmt / flows._changes(1, 0, refresh=True) for a job inserted by `j`, written
# out (EXCLUDED carries the fresh plan, weight, cap, V and now_s of the insert's values).
_NEW_CAP: Final = "CASE WHEN f.queued = 0 THEN EXCLUDED.cap ELSE f.cap END"
_ELIGIBLE: Final = f"(f.queued + 1 > 0 AND f.running + 0 < {_NEW_CAP})"
_ENTERING: Final = f"({_ELIGIBLE} AND NOT (f.queued > 0 AND f.running < f.cap))"
_HEAD: Final = (
    "CASE WHEN EXCLUDED.head_tag >= f.finish_tag THEN EXCLUDED.head_tag ELSE f.finish_tag END"
)
ENQUEUE_CTES: Final = f"""
, q AS (
    INSERT INTO dispatch_queue (job_id, task, queue, account_id, state, enqueued_at)
    SELECT j.id, %(task)s, %(queue)s, %(account_id)s, '{QUEUED}', %(now)s FROM j
), v AS (
    SELECT s.plan, {_by_plan("weight", "float8")} AS weight,
        COALESCE((SELECT l.running_cap FROM account_limits AS l
                  WHERE l.account_id = %(account_id)s), {_by_plan("cap", "integer")}) AS cap,
        COALESCE((SELECT sq.vtime FROM sched_queues AS sq WHERE sq.queue = %(queue)s), 0.0)
            AS vtime
    FROM (SELECT (SELECT a.plan FROM accounts AS a WHERE a.id = %(account_id)s) AS plan) AS s
), f AS (
    INSERT INTO sched_flows AS f (queue, account_id, plan, weight, cap, running, queued,
        finish_tag, head_tag, head_since_s, sort_key, eligible)
    SELECT %(queue)s, %(account_id)s, v.plan, v.weight, v.cap, 0, 1, 0.0, v.vtime,
        %(now_s)s::float8, v.vtime + %(b_aging)s::float8 * %(now_s)s::float8, v.cap > 0
    FROM j CROSS JOIN v
    ON CONFLICT (queue, account_id) DO UPDATE SET
        plan = CASE WHEN f.queued = 0 THEN EXCLUDED.plan ELSE f.plan END,
        weight = CASE WHEN f.queued = 0 THEN EXCLUDED.weight ELSE f.weight END,
        cap = {_NEW_CAP},
        running = f.running + 0,
        queued = f.queued + 1,
        head_tag = CASE WHEN {_ENTERING} THEN {_HEAD} ELSE f.head_tag END,
        head_since_s = CASE WHEN {_ENTERING} THEN EXCLUDED.head_since_s ELSE f.head_since_s END,
        sort_key = CASE WHEN {_ENTERING}
            THEN {_HEAD} + %(b_aging)s::float8 * EXCLUDED.head_since_s ELSE f.sort_key END,
        eligible = {_ELIGIBLE}
)"""
_RESULT: Final = f"""
SELECT {", ".join(f"h.{c}" for c in HOLD_COLUMNS)},
    EXISTS (SELECT 1 FROM balance_alerts AS a
            WHERE a.account_id = %(account_id)s AND a.kind = %(credit_kind)s) AS has_alert,
    (SELECT count(*) FROM j) AS inserted
FROM h"""
SUBMIT_SQL: Final = _HOLD_AND_INSERT + _RESULT
SUBMIT_ENQUEUE_SQL: Final = _HOLD_AND_INSERT + ENQUEUE_CTES + _RESULT


def _naive_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None)


def submit_params(
    values: dict[str, Any],
    ttl_s: int,
    payload: dict[str, Any],
    now: datetime,
    enqueue: tuple[str, str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The statement `insert_and_hold` runs and its parameters (the batch submit runs many
    of them at once)."""
    params = dict(values)
    for name in JSON_PARAMS:  # None as JSON null, as SQLAlchemy's JSON type stores it
        params[name] = Json(params[name])
    for name in TIME_PARAMS:
        params[name] = _naive_utc(params[name])
    params.update(ttl_s=ttl_s, payload=Json(payload), now=_naive_utc(now))
    if enqueue is None:
        return SUBMIT_SQL, params
    params.update(settings_params(get_settings()), task=enqueue[0], queue=enqueue[1])
    params["now_s"] = now.timestamp()
    return SUBMIT_ENQUEUE_SQL, params


def submitted_row(row: Any, values: dict[str, Any]) -> tuple[Row[Any], bool]:
    """The job row the statement inserted (as `values` and the server defaults make it) and
    whether the account has an alert on the kind; a refused hold raises what
    billing.ledger.hold raises."""
    hold_result(row, values["account_id"], values["credit_kind"], values["price"], values["id"])
    if row.inserted != 1:
        raise AssertionError(f"submit inserted {row.inserted} job rows for {values['id']}")
    job = JobRow(**{c.name: values.get(c.name, SERVER_DEFAULTS.get(c.name)) for c in jobs.c})
    return cast(Row[Any], job), bool(row.has_alert)


def insert_and_hold(
    conn: Connection,
    values: dict[str, Any],
    ttl_s: int,
    payload: dict[str, Any],
    now: datetime,
    enqueue: tuple[str, str] | None = None,
) -> tuple[Row[Any], bool]:
    """Hold `values["price"]` credits under the job's id and insert the job (`values`: the
    INSERTED columns) with its `event` outbox row; with `enqueue` = (task, queue), also
    `scheduler.enqueue(conn, id, task, account, now, new=True)`. Returns the job row and
    whether the account has an alert on the kind. Raises what billing.ledger.hold raises."""
    sql, params = submit_params(values, ttl_s, payload, now, enqueue)
    return submitted_row(conn.exec_driver_sql(sql, params).one(), values)


def submit_alone(
    engine: Engine,
    values: dict[str, Any],
    ttl_s: int,
    payload: dict[str, Any],
    now: datetime,
    enqueue: tuple[str, str],
) -> tuple[Row[Any], bool] | None:
    """`insert_and_hold` with the enqueue as ONE statement that is its own transaction, on a
    direct connection (orchestrator.db_direct): durable when it returns, no BEGIN or COMMIT
    round trips. A refused hold changes nothing but the expiry of grants already due (which
    any hold records) and raises as `insert_and_hold` does. None after a transient fault or
    a conflict (tried once): the statement may have committed, so the caller's next try
    must look for the job first."""
    sql, params = submit_params(values, ttl_s, payload, now, enqueue)
    try:
        found = run_statement(engine, sql, lambda: params, attempts_max=1)
    except DBAPIError as exc:
        if is_retryable(exc):
            return None
        raise
    return submitted_row(found, values)
