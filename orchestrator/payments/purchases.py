"""Provider-neutral money operations on the ledger: purchase, refund, renew, lapse.

A provider module (e.g. orchestrator.payments.stripe_events) verifies its webhook, maps each
event onto one of these and calls it inside one transaction together with `mark_event`, so
an event's effect and the record that it was processed commit together: a replay finds the
record and changes nothing. Each function takes the caller's Connection; none commits.

- purchase: grants (source `purchase`) idempotent on their references, and remembers which
  payment bought them (`payment_grants`), for refunds.
- refund: voids each grant a payment bought in proportion to the refunded share of the
  payment (cumulative: `floor(amount * refunded / paid)` minus what voids already asked for).
- renew: a paid subscription period: the plan from the price, and the month's credits
  (source `plan`) expiring at the period end, idempotent per invoice.
- lapse: a canceled subscription's plan ends at its period end (now if that has passed,
  else `lapse_due` applies it then, from beat); retention then drives the tunes' expiry.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import Connection, Engine, insert, select, update

from billing import ledger
from billing.clock import utcnow
from billing.db import run_transaction
from billing.tables import accounts, grants
from orchestrator.scheduling import outbox
from orchestrator.settlement import alerts, retention
from orchestrator.tables import payment_events, payment_grants, pending_refunds, subscriptions

log = logging.getLogger(__name__)

LAPSE_BATCH_MAX: Final = 100
DETAIL_MAX_CHARS: Final = 500


@dataclass(frozen=True)
class Credit:
    """One grant a payment buys."""

    reference: str
    kind: str
    amount: int
    expires_at: datetime | None


def already_processed(conn: Connection, provider: str, event_id: str) -> bool:
    return (
        conn.execute(
            select(payment_events.c.outcome).where(
                payment_events.c.provider == provider, payment_events.c.event_id == event_id
            )
        ).first()
        is not None
    )


def mark_event(
    conn: Connection,
    provider: str,
    event_id: str,
    type_: str,
    outcome: str,
    detail: str | None = None,
    now: datetime | None = None,
) -> None:
    """Record an event as handled, in the transaction of its effect (a concurrent duplicate
    hits the primary key; run_transaction reruns it, and it then sees this row)."""
    conn.execute(
        insert(payment_events).values(
            provider=provider,
            event_id=event_id,
            type=type_[:100],
            outcome=outcome,
            detail=None if detail is None else detail[:DETAIL_MAX_CHARS],
            received_at=now or utcnow(),
        )
    )


def _remember_payment(
    conn: Connection, provider: str, payment_ids: list[str], reference: str, account_id: str
) -> None:
    for payment_id in dict.fromkeys(payment_ids):
        key = (
            payment_grants.c.provider == provider,
            payment_grants.c.payment_id == payment_id,
            payment_grants.c.grant_reference == reference,
        )
        if conn.execute(select(payment_grants.c.account_id).where(*key)).first() is None:
            conn.execute(
                insert(payment_grants).values(
                    provider=provider,
                    payment_id=payment_id,
                    grant_reference=reference,
                    account_id=account_id,
                    created_at=utcnow(),
                )
            )


def _grant_all(
    conn: Connection,
    provider: str,
    payment_ids: list[str],
    account_id: str,
    credits: list[Credit],
    source: str,
    now: datetime,
) -> list[ledger.Grant]:
    granted = []
    for credit in credits:
        granted.append(
            ledger.grant(
                conn,
                account_id,
                credit.kind,
                credit.amount,
                source=source,
                reference=credit.reference,
                expires_at=credit.expires_at,
                now=now,
            )
        )
        _remember_payment(conn, provider, payment_ids, credit.reference, account_id)
    for kind in dict.fromkeys(c.kind for c in credits):
        alerts.check(conn, account_id, kind, now)  # a top-up re-arms
    return granted


def purchase(
    conn: Connection,
    provider: str,
    payment_ids: list[str],
    account_id: str,
    credits: list[Credit],
    now: datetime | None = None,
) -> list[ledger.Grant]:
    """Grant what a payment bought (idempotent on each credit's reference); a refund of the
    payment that arrived first is applied now."""
    now = now or utcnow()
    granted = _grant_all(conn, provider, payment_ids, account_id, credits, "purchase", now)
    _apply_pending_refunds(conn, provider, payment_ids, now)
    return granted


def _apply_pending_refunds(
    conn: Connection, provider: str, payment_ids: list[str], now: datetime
) -> None:
    for row in conn.execute(
        select(pending_refunds).where(
            pending_refunds.c.provider == provider, pending_refunds.c.payment_id.in_(payment_ids)
        )
    ).all():
        refund(conn, provider, payment_ids, int(row.refunded), int(row.paid), now)


def void_grant(
    conn: Connection, reference: str, amount: int | None, now: datetime | None = None
) -> ledger.Void:
    """Void (part of) a grant, check the account's alert, and announce the void (with its
    shortfall) on the events stream."""
    now = now or utcnow()
    done = ledger.void(conn, reference, amount, now=now)
    alerts.check(conn, done.account_id, done.kind, now)
    if done.requested:
        outbox.add(
            conn,
            "event",
            None,
            {
                "event": "grant.voided",
                "account_id": done.account_id,
                "kind": done.kind,
                "reference": reference,
                "voided": done.voided,
                "shortfall": done.shortfall,
                "total_shortfall": done.total_shortfall,
                "at": now.isoformat(),
            },
        )
        if done.shortfall:
            log.warning(
                "void of grant %s: %d credits were no longer there (spent, held or expired)",
                reference,
                done.shortfall,
            )
    return done


def refund(
    conn: Connection,
    provider: str,
    payment_ids: list[str],
    refunded: int,
    paid: int,
    now: datetime | None = None,
) -> list[ledger.Void]:
    """A payment was refunded, `refunded` of `paid` in all (cumulative, minor units): void
    that share of every grant it bought. Returns the voids made now (none: nothing new)."""
    if paid <= 0 or refunded <= 0:
        return []
    refunded = min(refunded, paid)
    refs = conn.execute(
        select(payment_grants.c.grant_reference)
        .where(payment_grants.c.provider == provider, payment_grants.c.payment_id.in_(payment_ids))
        .distinct()
        .order_by(payment_grants.c.grant_reference)
    ).scalars()
    references = list(refs)
    if not references:
        _remember_refund(conn, provider, payment_ids, refunded, paid)
        return []
    done = []
    for reference in references:
        g = conn.execute(
            select(grants.c.amount, grants.c.voided, grants.c.void_shortfall).where(
                grants.c.reference == reference
            )
        ).one()
        target = int(g.amount) * refunded // paid
        more = target - int(g.voided) - int(g.void_shortfall)
        if more > 0:
            done.append(void_grant(conn, reference, more, now))
    return done


def _remember_refund(
    conn: Connection, provider: str, payment_ids: list[str], refunded: int, paid: int
) -> None:
    """No grant is known for the payment yet (the refund came first, or it is not ours):
    keep the largest refund seen, for a purchase of it that may still arrive."""
    for payment_id in payment_ids[:1]:  # the provider's main id (Stripe: the payment intent)
        key = (pending_refunds.c.provider == provider, pending_refunds.c.payment_id == payment_id)
        found = conn.execute(select(pending_refunds.c.refunded).where(*key)).first()
        if found is None:
            conn.execute(
                insert(pending_refunds).values(
                    provider=provider,
                    payment_id=payment_id,
                    refunded=refunded,
                    paid=paid,
                    updated_at=utcnow(),
                )
            )
        elif refunded > int(found.refunded):
            conn.execute(
                update(pending_refunds)
                .where(*key)
                .values(refunded=refunded, paid=paid, updated_at=utcnow())
            )


def renew(
    conn: Connection,
    provider: str,
    subscription_id: str,
    account_id: str,
    plan: str,
    credits: list[Credit],
    period_end: datetime | None,
    payment_ids: list[str],
    now: datetime | None = None,
) -> list[ledger.Grant]:
    """A subscription period was paid: plan, subscription record, the month's credits."""
    now = now or utcnow()
    _upsert_subscription(conn, provider, subscription_id, account_id, plan, "active", period_end)
    account = ledger.get_account(conn, account_id)
    if account.plan != plan or account.plan_lapses_at is not None:
        retention.apply_plan(conn, account_id, plan, now)
    return _grant_all(conn, provider, payment_ids, account_id, credits, "plan", now)


def _upsert_subscription(
    conn: Connection,
    provider: str,
    subscription_id: str,
    account_id: str,
    plan: str | None,
    status: str,
    period_end: datetime | None,
) -> None:
    key = (
        subscriptions.c.provider == provider,
        subscriptions.c.subscription_id == subscription_id,
    )
    values = {"status": status[:40], "updated_at": utcnow()}
    if plan is not None:
        values["plan"] = plan
    if period_end is not None:
        values["current_period_end"] = period_end
    if conn.execute(select(subscriptions.c.account_id).where(*key)).first() is None:
        conn.execute(
            insert(subscriptions).values(
                provider=provider, subscription_id=subscription_id, account_id=account_id, **values
            )
        )
    else:
        conn.execute(update(subscriptions).where(*key).values(**values))


def subscription_account(conn: Connection, provider: str, subscription_id: str) -> str | None:
    return conn.execute(
        select(subscriptions.c.account_id).where(
            subscriptions.c.provider == provider,
            subscriptions.c.subscription_id == subscription_id,
        )
    ).scalar_one_or_none()


def link_subscription(
    conn: Connection, provider: str, subscription_id: str, account_id: str
) -> None:
    """Remember which account a subscription pays for (a checkout in subscription mode)."""
    if subscription_account(conn, provider, subscription_id) is None:
        _upsert_subscription(conn, provider, subscription_id, account_id, None, "incomplete", None)


def lapse(
    conn: Connection,
    provider: str,
    subscription_id: str,
    account_id: str,
    at: datetime,
    now: datetime | None = None,
) -> str:
    """A subscription was canceled: its plan lapses at `at` (its period end). Returns
    "lapsed" (applied now) or "scheduled" (lapse_due applies it at `at`)."""
    now = now or utcnow()
    _upsert_subscription(conn, provider, subscription_id, account_id, None, "canceled", None)
    if at <= now:
        retention.apply_plan(conn, account_id, "free", at)
        return "lapsed"
    conn.execute(update(accounts).where(accounts.c.id == account_id).values(plan_lapses_at=at))
    return "scheduled"


def lapse_due(engine: Engine, now: datetime | None = None) -> list[str]:
    """Beat: lapse the plans whose scheduled lapse time has come (retention starts then)."""
    at = now or utcnow()
    due = run_transaction(
        engine,
        lambda c: list(
            c.execute(
                select(accounts.c.id)
                .where(accounts.c.plan_lapses_at <= at)
                .order_by(accounts.c.plan_lapses_at)
                .limit(LAPSE_BATCH_MAX)
            ).scalars()
        ),
    )
    lapsed = []
    for account_id in due:

        def work(conn: Connection, account_id: str = account_id) -> bool:
            row = conn.execute(
                select(accounts.c.plan_lapses_at)
                .where(accounts.c.id == account_id)
                .with_for_update()
            ).one()
            if row.plan_lapses_at is None or row.plan_lapses_at > at:
                return False  # renewed meanwhile
            retention.apply_plan(conn, account_id, "free", row.plan_lapses_at)
            return True

        if run_transaction(engine, work):
            lapsed.append(account_id)
    return lapsed


def credits_arrived(engine: Engine, account_id: str, kinds: set[str]) -> list[str]:
    """After a grant commits: tune_image credits start the renders of tunes waiting in
    `awaiting_credits` (as an admin grant does), and what that started is published."""
    if "tune_image" not in kinds:
        return []
    from orchestrator.scheduling.dispatch import get_publisher
    from orchestrator.scheduling.scheduler import nudge
    from orchestrator.tunes import service as tunes

    started = tunes.start_waiting_renders(engine, account_id)
    with contextlib.suppress(Exception):  # best effort; beat's dispatcher covers failures
        nudge(engine, get_publisher(), started)  # the renders wait for a slot like any job
    return started
