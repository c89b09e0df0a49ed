"""The ledger's PostgreSQL fast path: `hold` and the resolutions in one round trip each.

They call the PL/pgSQL functions `tollgate_ledger_hold` and `tollgate_ledger_resolve`
(migration 0003), which do what billing.ledger's Python path does, in the same order and
with the same lock, and return an error code instead of raising (so what ran before the
error stays in the caller's transaction); this module turns the code into the same exception.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from billing.errors import (
    HoldAlreadyResolved,
    InsufficientCredits,
    InvalidAmount,
    ReferenceConflict,
    UnknownAccount,
    UnknownHold,
)
from billing.values import Hold, check_amount

# Plain driver SQL (pyformat, as psycopg takes it): no SQLAlchemy statement building or
# bind/result type processing per call. Timestamps go in and come out as naive UTC, which is
# what the `UTCDateTime` columns store.

_PG_HOLD_SQL = (
    "SELECT r_error, r_available, r_id, r_account_id, r_kind, r_amount, r_status,"
    " r_committed, r_expires_at FROM tollgate_ledger_hold(%(account)s::text, %(kind)s::text,"
    " %(amount)s::bigint, %(reference)s::text, %(ttl_s)s::integer, %(now)s::timestamp)"
)
_PG_RESOLVE_SQL = (
    "SELECT r_error, r_id, r_account_id, r_kind, r_amount, r_status, r_committed,"
    " r_expires_at FROM tollgate_ledger_resolve(%(reference)s::text, %(status)s::text,"
    " %(committed)s::bigint, %(now)s::timestamp)"
)
# The hold function's nine result columns, for a statement that calls it itself.
HOLD_COLUMNS = (
    "r_error",
    "r_available",
    "r_id",
    "r_account_id",
    "r_kind",
    "r_amount",
    "r_status",
    "r_committed",
    "r_expires_at",
)
_BIGINT_MAX = 2**63 - 1


def on_postgresql(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def _naive_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None)


def _pg_hold(row: Any, reference: str) -> Hold:
    """A Hold from the r_id..r_expires_at columns the functions return (last seven)."""
    hold_id, account_id, kind, amount, status, committed, expires_at = row[-7:]
    return Hold(
        id=hold_id,
        reference=reference,
        account_id=account_id,
        kind=kind,
        amount=int(amount),
        status=status,
        committed=int(committed),
        expires_at=expires_at.replace(tzinfo=UTC),
    )


def hold_pg(
    conn: Connection,
    account_id: str,
    kind: str,
    amount: int,
    reference: str,
    ttl_s: int,
    now: datetime,
) -> Hold:
    row = conn.exec_driver_sql(
        _PG_HOLD_SQL,
        {
            "account": account_id,
            "kind": kind,
            "amount": amount,
            "reference": reference,
            "ttl_s": ttl_s,
            "now": _naive_utc(now),
        },
    ).one()
    return hold_result(row, account_id, kind, amount, reference)


def hold_result(row: Any, account_id: str, kind: str, amount: int, reference: str) -> Hold:
    """The Hold from a row of `tollgate_ledger_hold`'s nine columns (in order, first), or
    its error code raised as the Python path's exception. For callers that run the function
    inside a larger statement of their own (the job service's submit)."""
    error = row[0]
    if error is None:
        return _pg_hold(row[:9], reference)
    if error == "unknown_account":
        raise UnknownAccount(account_id)
    if error == "insufficient":
        raise InsufficientCredits(kind, needed=amount, available=int(row[1]))
    if error == "conflict":
        existing = _pg_hold(row[:9], reference)
        raise ReferenceConflict(
            reference, f"a hold of {existing.amount} {existing.kind} on {existing.account_id}"
        )
    raise AssertionError(f"tollgate_ledger_hold returned {error!r}")


def resolve_pg(
    conn: Connection, reference: str, status: str, committed: Any, now: datetime
) -> Hold:
    """commit/release/expire in one statement. `committed` is the caller's amount, unchecked:
    the function checks it against the hold after the lock, where the Python path does."""
    valid = (
        not isinstance(committed, bool)
        and isinstance(committed, int)
        and 0 <= committed <= _BIGINT_MAX
    )
    row = conn.exec_driver_sql(
        _PG_RESOLVE_SQL,
        {
            "reference": reference,
            "status": status,
            "committed": committed if valid else None,  # NULL: refused after the lock
            "now": _naive_utc(now),
        },
    ).one()
    error = row[0]
    if error is None:
        return _pg_hold(row, reference)
    if error == "unknown_hold":
        raise UnknownHold(reference)
    if error == "unknown_account":
        raise UnknownAccount(row[2])
    found = _pg_hold(row, reference)
    if error == "resolved":
        raise HoldAlreadyResolved(reference, found.status)
    if error == "invalid_amount":
        check_amount("amount", committed, 0, found.amount)  # raises InvalidAmount
    if error == "not_due":
        raise InvalidAmount("expires_at", f"hold {reference!r} is not due until {found.expires_at}")
    raise AssertionError(f"tollgate_ledger_resolve returned {error!r}")
