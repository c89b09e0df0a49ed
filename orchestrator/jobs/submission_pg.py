"""Submit's PostgreSQL fast path: the hold, the job row, its `event` outbox row and the
alert lookup in ONE statement (one round trip instead of four).

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
"""

from __future__ import annotations

from collections import namedtuple
from datetime import UTC, datetime
from typing import Any, Final, cast

from psycopg.types.json import Json
from sqlalchemy import Connection
from sqlalchemy.engine import Row

from billing.ledger_pg import HOLD_COLUMNS, hold_result
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
SUBMIT_SQL: Final = f"""
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
)
SELECT {", ".join(f"h.{c}" for c in HOLD_COLUMNS)},
    EXISTS (SELECT 1 FROM balance_alerts AS a
            WHERE a.account_id = %(account_id)s AND a.kind = %(credit_kind)s) AS has_alert,
    (SELECT count(*) FROM j) AS inserted
FROM h"""


def _naive_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None)


def insert_and_hold(
    conn: Connection, values: dict[str, Any], ttl_s: int, payload: dict[str, Any], now: datetime
) -> tuple[Row[Any], bool]:
    """Hold `values["price"]` credits under the job's id and insert the job (`values`: the
    INSERTED columns) with its `event` outbox row. Returns the job row and whether the
    account has an alert on the kind. Raises what billing.ledger.hold raises."""
    params = dict(values)
    for name in JSON_PARAMS:  # None as JSON null, as SQLAlchemy's JSON type stores it
        params[name] = Json(params[name])
    for name in TIME_PARAMS:
        params[name] = _naive_utc(params[name])
    params.update(ttl_s=ttl_s, payload=Json(payload), now=_naive_utc(now))
    row = conn.exec_driver_sql(SUBMIT_SQL, params).one()
    hold_result(row, values["account_id"], values["credit_kind"], values["price"], values["id"])
    if row.inserted != 1:
        raise AssertionError(f"submit inserted {row.inserted} job rows for {values['id']}")
    job = JobRow(**{c.name: values.get(c.name, SERVER_DEFAULTS.get(c.name)) for c in jobs.c})
    return cast(Row[Any], job), bool(row.has_alert)
