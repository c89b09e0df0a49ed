"""Stripe webhook payloads built and signed in the tests the way Stripe documents it: the
`Stripe-Signature` header is `t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<payload>">` under
the endpoint's signing secret. Nothing here talks to Stripe."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from fastapi.testclient import TestClient

SECRET = "whsec_test_" + "a" * 24
WEBHOOK = "/v1/billing/stripe/webhook"

PACKS_TOML = """
[prices.price_img_100]
kind = "image"
amount = 100

[prices.price_img_10_expiring]
kind = "image"
amount = 10
expires_in_days = 30

[prices.price_tune_image_64]
kind = "tune_image"
amount = 64

[prices.price_standard_month]
plan = "standard"
monthly_credits = { image = 500, tune_image = 64 }
"""


def sign(payload: bytes, secret: str = SECRET, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def event(type_: str, obj: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {
        "id": event_id or "evt_" + secrets.token_hex(12),
        "object": "event",
        "api_version": "2025-10-29.clover",
        "created": int(time.time()),
        "livemode": False,
        "type": type_,
        "data": {"object": obj},
    }


def post(http: TestClient, evt: dict[str, Any], **sign_args: Any) -> Any:
    payload = json.dumps(evt).encode()
    return http.post(
        WEBHOOK,
        content=payload,
        headers={
            "Stripe-Signature": sign(payload, **sign_args),
            "Content-Type": "application/json",
        },
    )


def checkout(
    account_id: str,
    price_id: str = "price_img_100",
    payment_intent: str | None = None,
    amount_total: int = 1000,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": "cs_test_" + secrets.token_hex(10),
        "object": "checkout.session",
        "mode": "payment",
        "payment_status": "paid",
        "status": "complete",
        "amount_total": amount_total,
        "currency": "usd",
        "payment_intent": payment_intent or "pi_" + secrets.token_hex(10),
        "metadata": {"tollgate_account_id": account_id, "tollgate_price_id": price_id},
        **extra,
    }


def charge(payment_intent: str, amount: int, amount_refunded: int) -> dict[str, Any]:
    return {
        "id": "ch_" + secrets.token_hex(10),
        "object": "charge",
        "amount": amount,
        "amount_refunded": amount_refunded,
        "refunded": amount_refunded == amount,
        "currency": "usd",
        "payment_intent": payment_intent,
    }


def invoice(subscription_id: str, period_start: int, period_end: int) -> dict[str, Any]:
    """An invoice as API versions since 2025 send it (subscription under `parent`)."""
    return {
        "id": "in_" + secrets.token_hex(10),
        "object": "invoice",
        "status": "paid",
        "billing_reason": "subscription_cycle",
        "parent": {
            "type": "subscription_details",
            "subscription_details": {"subscription": subscription_id, "metadata": {}},
        },
        "lines": {
            "object": "list",
            "data": [
                {
                    "id": "il_" + secrets.token_hex(8),
                    "object": "line_item",
                    "amount": 2000,
                    "period": {"start": period_start, "end": period_end},
                    "pricing": {
                        "type": "price_details",
                        "price_details": {"price": "price_standard_month", "product": "prod_1"},
                    },
                    "metadata": {},
                }
            ],
        },
    }
