"""Voiding a grant, fully or in part (a refund of the payment that bought it).

A void takes credits out of the grant's free remainder only: never what a commit consumed,
never what an open hold reserved. Asking for more than is there voids what is there and
adds the rest to the grant's `void_shortfall`; credits an open hold later gives back to the
grant (release, expiry, the unused part of a commit) are voided then, up to the shortfall,
in the same transaction (billing.locked.void_owed_locked, and the PL/pgSQL resolution from
migration 0009). What stays in the shortfall was spent or expired before the refund.

Over a grant's life, voided + void_shortfall (what voids asked for) never exceeds its
amount. Every void writes one `void` entry (delta_balance = -voided, 0 when nothing was
free). Runs in the caller's transaction, on both backends, in Python (voids are rare).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select

from billing.clock import utcnow
from billing.errors import InvalidAmount, UnknownGrant
from billing.locked import expire_grants_locked, lock_balance, void_credits_locked
from billing.tables import grants
from billing.values import check_amount, check_reference


@dataclass(frozen=True)
class Void:
    reference: str
    account_id: str
    kind: str
    requested: int  # credits this void asked for
    voided: int  # of those, taken out of the grant now
    shortfall: int  # of those, not there (spent, expired or held)
    grant_amount: int
    total_voided: int  # over the grant's life, after this void
    total_shortfall: int  # the grant's void_shortfall now

    @property
    def open(self) -> int:
        """Credits no void has asked for yet."""
        return self.grant_amount - self.total_voided - self.total_shortfall


def void(
    conn: Connection,
    reference: str,
    amount: int | None = None,
    *,
    now: datetime | None = None,
) -> Void:
    """Void `amount` credits of the grant `reference` (None: all that no void asked for yet).
    Returns what was voided and the shortfall; raises UnknownGrant, or InvalidAmount for an
    amount outside 1..(amount - voided - shortfall)."""
    check_reference(reference)
    now = now or utcnow()
    found = conn.execute(
        select(grants.c.account_id, grants.c.kind).where(grants.c.reference == reference)
    ).first()
    if found is None:
        raise UnknownGrant(reference)
    lock_balance(conn, found.account_id, found.kind)
    expire_grants_locked(conn, found.account_id, found.kind, now)  # expired credits are gone
    g = conn.execute(select(grants).where(grants.c.reference == reference)).one()
    open_ = int(g.amount) - int(g.voided) - int(g.void_shortfall)
    if amount is None:
        requested = open_
    else:
        if open_ == 0:
            raise InvalidAmount("amount", f"nothing of grant {reference!r} is left to void")
        check_amount("amount", amount, 1, open_)
        requested = amount
    voided = min(requested, int(g.remaining))
    shortfall = requested - voided
    if requested:
        void_credits_locked(conn, g.account_id, g.kind, g.id, voided, shortfall, now)
    return Void(
        reference=reference,
        account_id=g.account_id,
        kind=g.kind,
        requested=requested,
        voided=voided,
        shortfall=shortfall,
        grant_amount=int(g.amount),
        total_voided=int(g.voided) + voided,
        total_shortfall=int(g.void_shortfall) + shortfall,
    )
