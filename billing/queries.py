"""Reads of the ledger: holds, balances as a user sees them, accounts, and the holds a
sweeper should expire. No locks, no writes; billing.ledger re-exports them, so callers use
one module for the ledger."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, and_, func, or_, select

from billing.clock import utcnow
from billing.errors import UnknownAccount
from billing.pricing import CREDIT_KINDS
from billing.tables import accounts, balances, grants, holds
from billing.values import Balance, Hold, check_kind

EXPIRE_BATCH_MAX = 500


def unexpired(now: datetime):  # type: ignore[no-untyped-def]
    """The condition for a grant that has not expired at `now`."""
    return or_(grants.c.expires_at.is_(None), grants.c.expires_at > now)


def _hold_from_row(row) -> Hold:  # type: ignore[no-untyped-def]
    return Hold(
        id=row.id,
        reference=row.reference,
        account_id=row.account_id,
        kind=row.kind,
        amount=int(row.amount),
        status=row.status,
        committed=int(row.committed),
        expires_at=row.expires_at,
    )


def get_hold(conn: Connection, reference: str) -> Hold | None:
    row = conn.execute(select(holds).where(holds.c.reference == reference)).first()
    return None if row is None else _hold_from_row(row)


def due_holds(conn: Connection, now: datetime, limit: int = EXPIRE_BATCH_MAX) -> list[str]:
    """References of open holds past their deadline (oldest first), for a sweeper."""
    return list(
        conn.execute(
            select(holds.c.reference)
            .where(holds.c.status == "open", holds.c.expires_at <= now)
            .order_by(holds.c.expires_at)
            .limit(limit)
        ).scalars()
    )


def get_balance(
    conn: Connection, account_id: str, kind: str, *, now: datetime | None = None
) -> Balance:
    """Balance as a user sees it: credits in expired grants are not counted, even before
    the sweeper has written their expiry entries."""
    check_kind(kind)
    now = now or utcnow()
    row = conn.execute(
        select(balances.c.held).where(balances.c.account_id == account_id, balances.c.kind == kind)
    ).first()
    if row is None:
        raise UnknownAccount(account_id)
    live = conn.execute(
        select(func.coalesce(func.sum(grants.c.remaining), 0)).where(
            and_(grants.c.account_id == account_id, grants.c.kind == kind, unexpired(now))
        )
    ).scalar_one()
    held = int(row.held)
    return Balance(kind, balance=int(live) + held, held=held, available=int(live))


def get_balances(
    conn: Connection, account_id: str, *, now: datetime | None = None
) -> list[Balance]:
    now = now or utcnow()
    return [get_balance(conn, account_id, kind, now=now) for kind in CREDIT_KINDS]


def get_account(conn: Connection, account_id: str):  # type: ignore[no-untyped-def]
    row = conn.execute(select(accounts).where(accounts.c.id == account_id)).first()
    if row is None:
        raise UnknownAccount(account_id)
    return row
