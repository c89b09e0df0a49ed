"""The credit ledger: accounts, grants, holds and entries.

Every function takes the caller's Connection and runs inside the caller's transaction; none
commits. Each mutation first locks the `balances` row of the (account, kind) it changes, so
concurrent holds against one account are serialised and can never overdraw it.

Burn order: a hold reserves credits from the grant that expires soonest first,
never-expiring grants last, older grants before newer ones. An expired grant is never
reserved from; credits already reserved by an open hold stay reserved when their grant
expires, and are consumed by its commit. Credits that a release returns to an expired grant
expire in the same transaction.

On PostgreSQL, `hold` and the resolutions (`commit`, `release`, `expire`) are one statement
each: they call the PL/pgSQL functions `tollgate_ledger_hold` and `tollgate_ledger_resolve`
(migration 0003; 0005 runs their grant expiry only when a grant is due), which do what the
Python path below does, in the same order and with the same lock, and return an error code
instead of raising (so, as in Python, what ran before the error stays in the caller's
transaction); billing.ledger_pg turns the code into the same exception. SQLite (and
everything else) runs the Python (Core) path.

Reads (holds, balances, accounts, due holds) are in billing.queries and re-exported here.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import Connection, insert, select, update

from billing.clock import utcnow
from billing.errors import (
    HoldAlreadyResolved,
    InsufficientCredits,
    InvalidAmount,
    ReferenceConflict,
    UnknownHold,
)
from billing.errors import UnknownGrant as UnknownGrant
from billing.ledger_pg import hold_pg, on_postgresql, resolve_pg
from billing.locked import (
    add_to_balance,
    burn_order,
    expire_grants_locked,
    lock_balance,
    void_owed_locked,
)
from billing.pricing import CREDIT_KINDS
from billing.queries import EXPIRE_BATCH_MAX, unexpired
from billing.queries import due_holds as due_holds  # re-exported: reads live in billing.queries
from billing.queries import get_account as get_account
from billing.queries import get_balance as get_balance
from billing.queries import get_balances as get_balances
from billing.queries import get_hold as get_hold
from billing.tables import (
    accounts,
    balances,
    entries,
    grants,
    hold_allocations,
    holds,
)
from billing.values import (
    Grant,
    Hold,
    check_amount,
    check_kind,
    check_reference,
)
from billing.voids import Void as Void
from billing.voids import void as void

PLANS = ("free", "standard", "business")
GRANT_SOURCES = ("purchase", "plan", "promo", "adjustment")
GRANT_AMOUNT_MAX = 10_000_000
HOLD_AMOUNT_MAX = 100_000
HOLD_TTL_S_MAX = 7 * 24 * 3600


def new_account_id() -> str:
    return "acc_" + secrets.token_hex(12)


def create_account(
    conn: Connection,
    name: str,
    plan: str,
    *,
    account_id: str | None = None,
    now: datetime | None = None,
) -> str:
    if plan not in PLANS:
        raise InvalidAmount("plan", f"must be one of {', '.join(PLANS)}, got {plan!r}")
    if not name or len(name) > 200:
        raise InvalidAmount("name", "must be 1..200 characters")
    account_id = account_id or new_account_id()
    conn.execute(
        insert(accounts).values(id=account_id, name=name, plan=plan, created_at=now or utcnow())
    )
    conn.execute(
        insert(balances),
        [
            {"account_id": account_id, "kind": kind, "balance": 0, "held": 0}
            for kind in CREDIT_KINDS
        ],
    )
    return account_id


def grant(
    conn: Connection,
    account_id: str,
    kind: str,
    amount: int,
    *,
    source: str,
    reference: str,
    expires_at: datetime | None = None,
    now: datetime | None = None,
) -> Grant:
    """Add credits. Idempotent on `reference`: the same grant again adds nothing."""
    check_kind(kind)
    check_amount("amount", amount, 1, GRANT_AMOUNT_MAX)
    check_reference(reference)
    if source not in GRANT_SOURCES:
        raise InvalidAmount("source", f"must be one of {', '.join(GRANT_SOURCES)}, got {source!r}")
    if expires_at is not None and expires_at.tzinfo is None:
        raise InvalidAmount("expires_at", "must carry a time zone")
    now = now or utcnow()
    lock_balance(conn, account_id, kind)
    existing = conn.execute(select(grants).where(grants.c.reference == reference)).first()
    if existing is not None:
        if (existing.account_id, existing.kind, existing.amount) != (account_id, kind, amount):
            raise ReferenceConflict(
                reference, f"a grant of {existing.amount} {existing.kind} to {existing.account_id}"
            )
        return Grant(existing.id, reference, account_id, kind, amount, created=False)
    grant_id = conn.execute(
        insert(grants)
        .values(
            account_id=account_id,
            kind=kind,
            source=source,
            amount=amount,
            remaining=amount,
            expired=0,
            expires_at=expires_at,
            reference=reference,
            created_at=now,
        )
        .returning(grants.c.id)
    ).scalar_one()
    conn.execute(
        insert(entries).values(
            account_id=account_id,
            kind=kind,
            type="grant",
            delta_balance=amount,
            delta_held=0,
            grant_id=grant_id,
            created_at=now,
        )
    )
    add_to_balance(conn, account_id, kind, amount, 0)
    expire_grants_locked(conn, account_id, kind, now)  # a grant that is born expired
    return Grant(grant_id, reference, account_id, kind, amount, created=True)


def check_hold(kind: str, amount: int, ttl_s: int, reference: str) -> None:
    """A hold's arguments, checked before anything runs (InvalidAmount naming the field)."""
    check_kind(kind)
    check_amount("amount", amount, 1, HOLD_AMOUNT_MAX)
    check_amount("ttl_s", ttl_s, 1, HOLD_TTL_S_MAX)
    check_reference(reference)


def hold(
    conn: Connection,
    account_id: str,
    kind: str,
    amount: int,
    *,
    reference: str,
    ttl_s: int,
    now: datetime | None = None,
) -> Hold:
    """Reserve `amount` credits under `reference` (unique; a retry returns the same hold).
    Raises InsufficientCredits (with needed and available) when they are not there."""
    check_hold(kind, amount, ttl_s, reference)
    now = now or utcnow()
    if on_postgresql(conn):
        return hold_pg(conn, account_id, kind, amount, reference, ttl_s, now)
    lock_balance(conn, account_id, kind)
    existing = get_hold(conn, reference)
    if existing is not None:
        if (existing.account_id, existing.kind, existing.amount) != (account_id, kind, amount):
            raise ReferenceConflict(
                reference, f"a hold of {existing.amount} {existing.kind} on {existing.account_id}"
            )
        return existing
    expire_grants_locked(conn, account_id, kind, now)
    live = conn.execute(
        select(grants.c.id, grants.c.remaining)
        .where(
            grants.c.account_id == account_id,
            grants.c.kind == kind,
            grants.c.remaining > 0,
            unexpired(now),
        )
        .order_by(*burn_order())
    ).all()
    available = sum(int(r.remaining) for r in live)
    if available < amount:
        raise InsufficientCredits(kind, needed=amount, available=available)
    expires_at = now + timedelta(seconds=ttl_s)
    hold_id = conn.execute(
        insert(holds)
        .values(
            reference=reference,
            account_id=account_id,
            kind=kind,
            amount=amount,
            status="open",
            committed=0,
            created_at=now,
            expires_at=expires_at,
        )
        .returning(holds.c.id)
    ).scalar_one()
    allocations = []
    still_needed = amount
    for grant_id, remaining in live:
        take = min(int(remaining), still_needed)
        allocations.append(
            {"hold_id": hold_id, "grant_id": grant_id, "amount": take, "committed": 0}
        )
        conn.execute(
            update(grants)
            .where(grants.c.id == grant_id)
            .values(remaining=grants.c.remaining - take)
        )
        still_needed -= take
        if still_needed == 0:
            break
    conn.execute(insert(hold_allocations), allocations)
    conn.execute(
        insert(entries).values(
            account_id=account_id,
            kind=kind,
            type="hold",
            delta_balance=0,
            delta_held=amount,
            hold_id=hold_id,
            created_at=now,
        )
    )
    add_to_balance(conn, account_id, kind, 0, amount)
    return Hold(hold_id, reference, account_id, kind, amount, "open", 0, expires_at)


def _lock_open_hold(conn: Connection, reference: str) -> Hold:
    found = get_hold(conn, reference)
    if found is None:
        raise UnknownHold(reference)
    lock_balance(conn, found.account_id, found.kind)
    locked = get_hold(conn, reference)  # re-read under the lock: another resolver may have won
    assert locked is not None
    if locked.status != "open":
        raise HoldAlreadyResolved(reference, locked.status)
    return locked


def _resolve(conn: Connection, the_hold: Hold, status: str, committed: int, now: datetime) -> Hold:
    """Consume `committed` credits (burn order) and give the rest back to their grants."""
    allocs = conn.execute(
        select(hold_allocations.c.grant_id, hold_allocations.c.amount)
        .join(grants, grants.c.id == hold_allocations.c.grant_id)
        .where(hold_allocations.c.hold_id == the_hold.id)
        .order_by(*burn_order())
    ).all()
    to_commit = committed
    for grant_id, amount in allocs:
        take = min(int(amount), to_commit)
        to_commit -= take
        if take:
            conn.execute(
                update(hold_allocations)
                .where(
                    hold_allocations.c.hold_id == the_hold.id,
                    hold_allocations.c.grant_id == grant_id,
                )
                .values(committed=take)
            )
        if int(amount) - take:
            conn.execute(
                update(grants)
                .where(grants.c.id == grant_id)
                .values(remaining=grants.c.remaining + (int(amount) - take))
            )
    conn.execute(
        update(holds)
        .where(holds.c.id == the_hold.id, holds.c.status == "open")
        .values(status=status, committed=committed, resolved_at=now)
    )
    entry_type = {"committed": "commit", "released": "release", "expired": "expire_hold"}[status]
    conn.execute(
        insert(entries).values(
            account_id=the_hold.account_id,
            kind=the_hold.kind,
            type=entry_type,
            delta_balance=-committed,
            delta_held=-the_hold.amount,
            hold_id=the_hold.id,
            created_at=now,
        )
    )
    add_to_balance(conn, the_hold.account_id, the_hold.kind, -committed, -the_hold.amount)
    # Credits returned to a grant that expired while they were reserved expire now; those
    # returned to a grant refunded while they were reserved are voided now.
    expire_grants_locked(conn, the_hold.account_id, the_hold.kind, now)
    void_owed_locked(conn, the_hold.account_id, the_hold.kind, now)
    return Hold(
        the_hold.id,
        the_hold.reference,
        the_hold.account_id,
        the_hold.kind,
        the_hold.amount,
        status,
        committed,
        the_hold.expires_at,
    )


def commit(conn: Connection, reference: str, amount: int, *, now: datetime | None = None) -> Hold:
    """Charge `amount` (<= held) of a hold; the rest is released. Once per hold."""
    if on_postgresql(conn):
        return resolve_pg(conn, reference, "committed", amount, now or utcnow())
    locked = _lock_open_hold(conn, reference)
    check_amount("amount", amount, 0, locked.amount)
    return _resolve(conn, locked, "committed", amount, now or utcnow())


def release(conn: Connection, reference: str, *, now: datetime | None = None) -> Hold:
    """Give a hold's credits back. Once per hold."""
    if on_postgresql(conn):
        return resolve_pg(conn, reference, "released", 0, now or utcnow())
    return _resolve(conn, _lock_open_hold(conn, reference), "released", 0, now or utcnow())


def expire(conn: Connection, reference: str, *, now: datetime | None = None) -> Hold:
    """Expire one hold that is past its deadline (its credits go back)."""
    now = now or utcnow()
    if on_postgresql(conn):
        return resolve_pg(conn, reference, "expired", 0, now)
    locked = _lock_open_hold(conn, reference)
    if locked.expires_at > now:
        raise InvalidAmount(
            "expires_at", f"hold {reference!r} is not due until {locked.expires_at}"
        )
    return _resolve(conn, locked, "expired", 0, now)


def expire_grants(
    conn: Connection, now: datetime | None = None, limit: int = EXPIRE_BATCH_MAX
) -> int:
    """Sweep: write expiry entries for every expired grant with unreserved credits left."""
    now = now or utcnow()
    pairs = conn.execute(
        select(grants.c.account_id, grants.c.kind)
        .where(grants.c.remaining > 0, grants.c.expires_at <= now)
        .distinct()
        .limit(limit)
    ).all()
    total = 0
    for account_id, kind in sorted(pairs):
        lock_balance(conn, account_id, kind)
        total += expire_grants_locked(conn, account_id, kind, now)
    return total
