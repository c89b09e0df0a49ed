"""Stripe: verify a webhook and map its event onto the provider-neutral operations in
orchestrator.payments.purchases. Nothing here calls Stripe's API; the `stripe` package is used
only for its offline signature check (`stripe.Webhook.construct_event`, default tolerance).

Events handled (everything else is answered 200 and counted as `unhandled`):
- `checkout.session.completed` / `checkout.session.async_payment_succeeded`, mode `payment`,
  `payment_status` `paid`, `metadata.tollgate_account_id`: a purchase of the packs named by
  `line_items` (when the payload carries them) or `metadata.tollgate_price_id` (and
  `metadata.tollgate_quantity`, default 1). Grant reference `stripe:<session>:<price>`; the
  payment intent and the session id are remembered for refunds. In mode `subscription` the
  session links the subscription to the account.
- `charge.refunded`: `amount_refunded` of `amount` voids that share of what the charge's
  payment intent (or the charge or its invoice) bought.
- `invoice.paid` with a subscription: renew (plan and monthly credits from the plan price of
  its lines, expiring at the line's period end; reference `stripe:<invoice>:<kind>`).
- `customer.subscription.deleted`, or `customer.subscription.updated` with status
  `canceled`: lapse at the period end.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import stripe
from sqlalchemy import Connection, Engine

from billing import BillingError
from billing.db import run_transaction
from billing.ledger import GRANT_AMOUNT_MAX
from orchestrator.errors import OrchestratorError
from orchestrator.payments import packs, purchases

log = logging.getLogger(__name__)

PROVIDER: Final = "stripe"
QUANTITY_MAX: Final = 100
LINES_MAX: Final = 100
ID_MAX_CHARS: Final = 200
HANDLED: Final = (
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "charge.refunded",
    "invoice.paid",
    "customer.subscription.deleted",
    "customer.subscription.updated",
)


class WebhookRejected(OrchestratorError):
    """Answered 400: a bad or stale signature, a body that is not an event, or an event
    this deployment cannot map yet (an unknown price: fix the packs file, Stripe retries)."""


@dataclass(frozen=True)
class Outcome:
    outcome: str  # processed, duplicate, ignored, unhandled
    detail: str = ""
    account_id: str | None = None
    kinds: set[str] = field(default_factory=set)


def verify(payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    """The verified event as a dict, or WebhookRejected."""
    if not secret:
        raise WebhookRejected("TOLLGATE_STRIPE_WEBHOOK_SECRET is not set")
    if not signature:
        raise WebhookRejected("Stripe-Signature: missing")
    try:
        stripe.Webhook.construct_event(payload, signature, secret)
    except stripe.SignatureVerificationError as exc:
        raise WebhookRejected(f"Stripe-Signature: {exc.user_message or exc}") from exc
    except Exception as exc:  # not JSON, not an event object
        raise WebhookRejected(f"body: not a Stripe event ({type(exc).__name__})") from exc
    event = json.loads(payload)
    if (
        not isinstance(event, dict)
        or not _is_id(event.get("id"))
        or not isinstance(event.get("type"), str)
        or not isinstance(_get(event, "data", "object"), dict)
    ):
        raise WebhookRejected("body: an event needs `id`, `type` and `data.object`")
    return event


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= ID_MAX_CHARS


def _get(obj: Any, *path: str | int) -> Any:
    for key in path:
        if isinstance(key, int):
            obj = obj[key] if isinstance(obj, list) and 0 <= key < len(obj) else None
        elif isinstance(obj, dict):
            obj = obj.get(key)
        else:
            return None
    return obj


def _ids(*values: Any) -> list[str]:
    return [v for v in values if _is_id(v)]


def _time(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _int_field(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WebhookRejected(f"data.object.{name}: must be a non-negative integer")
    return value


Effect = Callable[[Connection], Outcome]


def handle(engine: Engine, event: dict[str, Any], packs_path: Path | None) -> Outcome:
    """Apply a verified event once. Its effect and its `payment_events` row commit together."""
    type_, event_id = event["type"], event["id"]
    if type_ not in HANDLED:
        log.info("stripe event %s of unhandled type %s ignored", event_id, type_)
        return Outcome("unhandled", type_)
    effect = _effect_for(event, packs_path)  # parse before the transaction: 400s change nothing

    def work(conn: Connection) -> Outcome:
        if purchases.already_processed(conn, PROVIDER, event_id):
            return Outcome("duplicate")
        outcome = effect(conn)
        purchases.mark_event(conn, PROVIDER, event_id, type_, outcome.outcome, outcome.detail)
        return outcome

    try:
        result = run_transaction(engine, work)
    except BillingError as exc:  # unknown account, a reference reused: record, do not retry
        detail = str(exc)
        log.warning("stripe event %s (%s) not applied: %s", event_id, type_, detail)

        def record(conn: Connection) -> Outcome:
            if purchases.already_processed(conn, PROVIDER, event_id):
                return Outcome("duplicate")
            purchases.mark_event(conn, PROVIDER, event_id, type_, "ignored", detail)
            return Outcome("ignored", detail)

        return run_transaction(engine, record)
    if result.outcome == "ignored":
        log.info("stripe event %s (%s) ignored: %s", event_id, type_, result.detail)
    if result.account_id and result.kinds:
        purchases.credits_arrived(engine, result.account_id, result.kinds)
    return result


def _ignored(detail: str) -> Effect:
    return lambda conn: Outcome("ignored", detail)


def _effect_for(event: dict[str, Any], packs_path: Path | None) -> Effect:
    obj: dict[str, Any] = event["data"]["object"]
    type_ = event["type"]
    created = _time(event.get("created")) or datetime.now(UTC)
    if type_.startswith("checkout.session."):
        return _checkout(obj, packs_path, created)
    if type_ == "charge.refunded":
        return _refund(obj)
    if type_ == "invoice.paid":
        return _invoice(obj, packs_path)
    if type_ == "customer.subscription.updated" and obj.get("status") != "canceled":
        return _ignored(f"subscription status {obj.get('status')!r}")
    return _subscription_ended(obj, created)


def _account_in(*metadatas: Any) -> str | None:
    for metadata in metadatas:
        account_id = _get(metadata, "tollgate_account_id")
        if _is_id(account_id):
            return str(account_id)
    return None


def _checkout(s: dict[str, Any], packs_path: Path | None, created: datetime) -> Effect:
    account_id = _account_in(s.get("metadata"))
    session_id = s.get("id")
    if account_id is None or not _is_id(session_id):
        return _ignored("no metadata.tollgate_account_id (not a Tollgate checkout)")
    if s.get("mode") == "subscription":
        if not _is_id(s.get("subscription")):
            return _ignored("subscription checkout without a subscription id")
        sub_id = str(s["subscription"])

        def link(conn: Connection) -> Outcome:
            purchases.link_subscription(conn, PROVIDER, sub_id, account_id)
            return Outcome("processed", f"subscription {sub_id} linked", account_id)

        return link
    if s.get("mode") != "payment":
        return _ignored(f"checkout mode {s.get('mode')!r}")
    if s.get("payment_status") != "paid":
        return _ignored(f"payment_status {s.get('payment_status')!r}")
    catalog = _catalog(packs_path)
    credits = []
    for price_id, quantity in _checkout_prices(s):
        pack = catalog.packs.get(price_id)
        if pack is None:
            raise WebhookRejected(f"price {price_id!r} is not a pack in TOLLGATE_CREDIT_PACKS")
        amount = pack.amount * quantity
        if amount > GRANT_AMOUNT_MAX:
            raise WebhookRejected(f"price {price_id!r} x {quantity}: more than {GRANT_AMOUNT_MAX}")
        expires_at = (
            None if pack.expires_in_days is None else created + timedelta(days=pack.expires_in_days)
        )
        credits.append(
            purchases.Credit(f"stripe:{session_id}:{price_id}", pack.kind, amount, expires_at)
        )
    if not credits:
        return _ignored("no line_items and no metadata.tollgate_price_id")
    payment_ids = _ids(s.get("payment_intent"), session_id)

    def buy(conn: Connection) -> Outcome:
        purchases.purchase(conn, PROVIDER, payment_ids, account_id, credits)
        kinds = {c.kind for c in credits}
        detail = ", ".join(f"{c.amount} {c.kind}" for c in credits)
        return Outcome("processed", detail, account_id, kinds)

    return buy


def _checkout_prices(s: dict[str, Any]) -> list[tuple[str, int]]:
    lines = _get(s, "line_items", "data")
    found: list[tuple[str, int]] = []
    if isinstance(lines, list):
        for line in lines[:LINES_MAX]:
            price_id = _get(line, "price", "id")
            if _is_id(price_id):
                found.append((price_id, _quantity(_get(line, "quantity"))))
    if not found and _is_id(_get(s, "metadata", "tollgate_price_id")):
        quantity = _get(s, "metadata", "tollgate_quantity")
        found.append((s["metadata"]["tollgate_price_id"], _quantity(quantity)))
    return found


def _quantity(value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= QUANTITY_MAX:
        raise WebhookRejected(f"quantity: must be an integer in 1..{QUANTITY_MAX}")
    return value


def _refund(c: dict[str, Any]) -> Effect:
    paid, refunded = _int_field(c, "amount"), _int_field(c, "amount_refunded")
    payment_ids = _ids(c.get("payment_intent"), c.get("id"), c.get("invoice"))
    if not payment_ids:
        raise WebhookRejected("data.object: a charge needs an `id`")

    def refund(conn: Connection) -> Outcome:
        voids = purchases.refund(conn, PROVIDER, payment_ids, refunded, paid)
        if not voids:
            return Outcome(
                "processed", "nothing (more) to void; a purchase not seen yet applies it"
            )
        detail = "; ".join(
            f"{v.reference}: voided {v.voided}, shortfall {v.shortfall}" for v in voids
        )
        return Outcome("processed", detail, voids[0].account_id)

    return refund


def _price_of(line: Any) -> Any:
    return _get(line, "price", "id") or _get(line, "pricing", "price_details", "price")


def _invoice(inv: dict[str, Any], packs_path: Path | None) -> Effect:
    found = inv.get("subscription")
    if not _is_id(found):
        found = _get(inv, "parent", "subscription_details", "subscription")
    invoice_id = inv.get("id")
    if not _is_id(found) or not _is_id(invoice_id):
        return _ignored("not a subscription invoice")
    sub_id = str(found)
    catalog = _catalog(packs_path)
    lines = _get(inv, "lines", "data")
    plan_lines = [
        (catalog.plans[price], line)
        for line in (lines[:LINES_MAX] if isinstance(lines, list) else [])
        if isinstance(price := _price_of(line), str) and price in catalog.plans
    ]
    if not plan_lines:
        prices = [_price_of(line) for line in lines or []][:5] if isinstance(lines, list) else []
        log.warning(
            "stripe invoice %s: no plan price of TOLLGATE_CREDIT_PACKS in %s", invoice_id, prices
        )
        return _ignored(f"no plan price in the invoice's lines ({prices})")
    plan, line = max(plan_lines, key=lambda pl: _get(pl[1], "period", "end") or 0)
    period_end = _time(_get(line, "period", "end"))
    account_hint = _account_in(
        inv.get("metadata"),
        _get(inv, "subscription_details", "metadata"),
        _get(inv, "parent", "subscription_details", "metadata"),
        line.get("metadata"),
    )
    credits = [
        purchases.Credit(f"stripe:{invoice_id}:{kind}", kind, amount, period_end)
        for kind, amount in plan.monthly_credits.items()
    ]
    payment_ids = _ids(inv.get("payment_intent"), inv.get("charge"), invoice_id)

    def renew(conn: Connection) -> Outcome:
        account_id = account_hint or purchases.subscription_account(conn, PROVIDER, sub_id)
        if account_id is None:
            return Outcome("ignored", f"subscription {sub_id} has no Tollgate account")
        purchases.renew(
            conn, PROVIDER, sub_id, account_id, plan.plan, credits, period_end, payment_ids
        )
        kinds = {c.kind for c in credits}
        return Outcome("processed", f"plan {plan.plan} until {period_end}", account_id, kinds)

    return renew


def _subscription_ended(sub: dict[str, Any], created: datetime) -> Effect:
    if not _is_id(sub.get("id")):
        raise WebhookRejected("data.object: a subscription needs an `id`")
    sub_id = str(sub["id"])
    at = (
        _time(sub.get("current_period_end"))
        or _time(_get(sub, "items", "data", 0, "current_period_end"))
        or _time(sub.get("ended_at"))
        or created
    )
    account_hint = _account_in(sub.get("metadata"))

    def lapse(conn: Connection) -> Outcome:
        account_id = account_hint or purchases.subscription_account(conn, PROVIDER, sub_id)
        if account_id is None:
            return Outcome("ignored", f"subscription {sub_id} has no Tollgate account")
        how = purchases.lapse(conn, PROVIDER, sub_id, account_id, at)
        return Outcome("processed", f"plan {how} at {at.isoformat()}", account_id)

    return lapse


def _catalog(packs_path: Path | None) -> packs.Catalog:
    try:
        return packs.load(packs_path)
    except packs.PacksError as exc:
        log.error("stripe webhook: %s", exc)
        raise WebhookRejected(str(exc)) from exc
