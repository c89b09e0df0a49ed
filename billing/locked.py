"""Steps the ledger's mutations take under the `balances` row lock of one (account, kind):
take the lock, move the cached sums, and the two lazy grant sweeps (expiry of expired
grants' free credits, and the voiding of credits owed to a refund). Shared by
billing.ledger and billing.voids; the caller holds the lock for everything but
`lock_balance` itself."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, insert, nulls_last, select, update

from billing.errors import UnknownAccount
from billing.tables import balances, entries, grants


def lock_balance(conn: Connection, account_id: str, kind: str) -> tuple[int, int]:
    row = conn.execute(
        select(balances.c.balance, balances.c.held)
        .where(balances.c.account_id == account_id, balances.c.kind == kind)
        .with_for_update()
    ).first()
    if row is None:
        raise UnknownAccount(account_id)
    return int(row.balance), int(row.held)


def add_to_balance(
    conn: Connection, account_id: str, kind: str, delta_balance: int, delta_held: int
) -> None:
    conn.execute(
        update(balances)
        .where(balances.c.account_id == account_id, balances.c.kind == kind)
        .values(balance=balances.c.balance + delta_balance, held=balances.c.held + delta_held)
    )


def burn_order():  # type: ignore[no-untyped-def]
    return (nulls_last(grants.c.expires_at.asc()), grants.c.id.asc())


def _entry(
    conn: Connection,
    account_id: str,
    kind: str,
    type_: str,
    delta: int,
    grant_id: int,
    now: datetime,
) -> None:
    conn.execute(
        insert(entries).values(
            account_id=account_id,
            kind=kind,
            type=type_,
            delta_balance=delta,
            delta_held=0,
            grant_id=grant_id,
            created_at=now,
        )
    )


def expire_grants_locked(conn: Connection, account_id: str, kind: str, now: datetime) -> int:
    """Expire the unreserved remainder of this account's expired grants."""
    due = conn.execute(
        select(grants.c.id, grants.c.remaining).where(
            grants.c.account_id == account_id,
            grants.c.kind == kind,
            grants.c.remaining > 0,
            grants.c.expires_at <= now,
        )
    ).all()
    total = 0
    for grant_id, remaining in due:
        conn.execute(
            update(grants)
            .where(grants.c.id == grant_id)
            .values(remaining=0, expired=grants.c.expired + remaining)
        )
        _entry(conn, account_id, kind, "expire_grant", -remaining, grant_id, now)
        total += remaining
    if total:
        add_to_balance(conn, account_id, kind, -total, 0)
    return total


def void_credits_locked(
    conn: Connection,
    account_id: str,
    kind: str,
    grant_id: int,
    voided: int,
    shortfall: int,
    now: datetime,
) -> None:
    """Take `voided` credits out of a grant's remaining and move `shortfall` onto its
    void_shortfall (negative: a shortfall paid off), with one `void` entry."""
    conn.execute(
        update(grants)
        .where(grants.c.id == grant_id)
        .values(
            remaining=grants.c.remaining - voided,
            voided=grants.c.voided + voided,
            void_shortfall=grants.c.void_shortfall + shortfall,
        )
    )
    _entry(conn, account_id, kind, "void", -voided, grant_id, now)
    if voided:
        add_to_balance(conn, account_id, kind, -voided, 0)


def void_owed_locked(conn: Connection, account_id: str, kind: str, now: datetime) -> int:
    """Credits a hold gave back to a grant that a void could not fully take (they were
    held then) are voided now, up to the grant's shortfall. Runs after the expiry sweep."""
    owed = conn.execute(
        select(grants.c.id, grants.c.remaining, grants.c.void_shortfall).where(
            grants.c.account_id == account_id,
            grants.c.kind == kind,
            grants.c.void_shortfall > 0,
            grants.c.remaining > 0,
        )
    ).all()
    total = 0
    for grant_id, remaining, shortfall in owed:
        n = min(int(remaining), int(shortfall))
        void_credits_locked(conn, account_id, kind, grant_id, n, -n, now)
        total += n
    return total
