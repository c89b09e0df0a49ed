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
tests/api/test_submit_paths.py checks both give the same ledger effects.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import JSON, BigInteger, Boolean, Connection, bindparam, column, text
from sqlalchemy.engine import Row
from sqlalchemy.sql.elements import TextClause

from billing.ledger_pg import HOLD_COLUMNS, hold_result
from billing.tables import UTCDateTime
from orchestrator.tables import jobs

# The job columns submit writes; the others take their server defaults (0, false, NULL).
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
JSON_PARAMS: Final = ("spec", "outputs", "webhook_events_filter")
_CASTS: Final = {name: f"CAST(:{name} AS JSON)" for name in JSON_PARAMS}


def _statement() -> TextClause:
    values = ", ".join(_CASTS.get(name, f":{name}") for name in INSERTED)
    returned = ", ".join(f"j.{c.name}" for c in jobs.c)  # by name: the table's order in Python
    sql = f"""
WITH h AS (
    SELECT {", ".join(HOLD_COLUMNS)} FROM tollgate_ledger_hold(
        CAST(:account_id AS text), CAST(:credit_kind AS text), CAST(:price AS bigint),
        CAST(:id AS text), CAST(:ttl_s AS integer), CAST(:now AS timestamp))
), j AS (
    INSERT INTO jobs ({", ".join(INSERTED)})
    SELECT {values} FROM h WHERE h.r_error IS NULL
    RETURNING *
), o AS (
    INSERT INTO outbox (topic, job_id, payload, created_at)
    SELECT 'event', j.id, CAST(:payload AS JSON), :now FROM j
)
SELECT {", ".join(f"h.{c}" for c in HOLD_COLUMNS)},
    EXISTS (SELECT 1 FROM balance_alerts AS a
            WHERE a.account_id = :account_id AND a.kind = :credit_kind) AS has_alert,
    {returned}
FROM h LEFT JOIN j ON true"""
    hold_types: dict[str, Any] = {"r_available": BigInteger, "r_expires_at": UTCDateTime}
    return (
        text(sql)
        .bindparams(
            *(bindparam(name, type_=JSON) for name in (*JSON_PARAMS, "payload")),
            *(bindparam(name, type_=UTCDateTime) for name in ("now", "deadline_at")),
            *(bindparam(name, type_=UTCDateTime) for name in ("created_at", "updated_at")),
        )
        .columns(
            *(column(name, hold_types.get(name)) for name in HOLD_COLUMNS),
            column("has_alert", Boolean),
            *jobs.c,
        )
    )


SUBMIT: Final = _statement()  # built once: the hot path's one statement


def insert_and_hold(
    conn: Connection, values: dict[str, Any], ttl_s: int, payload: dict[str, Any], now: datetime
) -> tuple[Row[Any], bool]:
    """Hold `values["price"]` credits under the job's id and insert the job (`values`: the
    INSERTED columns) with its `event` outbox row. Returns the job row and whether the
    account has an alert on the kind. Raises what billing.ledger.hold raises."""
    row = conn.execute(SUBMIT, {**values, "ttl_s": ttl_s, "payload": payload, "now": now}).one()
    hold_result(row, values["account_id"], values["credit_kind"], values["price"], values["id"])
    return row, bool(row.has_alert)
