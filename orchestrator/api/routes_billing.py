"""Payment provider webhooks (`POST /v1/billing/stripe/webhook`) and low-balance alerts for
the caller's own account (`PUT /v1/alerts`, `GET /v1/alerts`)."""

from __future__ import annotations

import logging
from typing import Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from billing.db import run_transaction
from orchestrator.api.deps import AccountId, EngineDep
from orchestrator.api.docs import ok, responses
from orchestrator.api.schemas import AlertsIn, AlertsOut, ErrorOut
from orchestrator.api.unavailable import UNAVAILABLE_RESPONSES
from orchestrator.payments import stripe_events
from orchestrator.settings import get_settings
from orchestrator.settlement import alerts

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["billing"], responses=UNAVAILABLE_RESPONSES)

ERRORS: Final[dict[int | str, dict[str, Any]]] = responses(401)
ALERTS_EXAMPLE: Final = {
    "webhook_url": "https://example.com/hooks/tollgate",
    "thresholds": {"image": 10},
    "armed": {"image": True},
}
ALERTS_OK: Final = ok(
    AlertsOut, "the account's thresholds, armed flags and webhook URL", ALERTS_EXAMPLE
)


def _count(request: Request, provider: str, type_: str, outcome: str) -> None:
    counter = getattr(request.app.state, "payment_events", None)
    if counter is not None:
        counter.labels(provider, type_[:100], outcome).inc()


@router.post(
    "/billing/stripe/webhook",
    responses={
        200: {
            "description": "processed, a replay, ignored, or an unhandled type",
            "content": {"application/json": {"example": {"outcome": "processed"}}},
        },
        400: {
            "model": ErrorOut,
            "description": "bad or stale signature, or not processable",
            "content": {"application/json": {"example": {"detail": "bad Stripe-Signature"}}},
        },
        **responses(),
    },
)
async def stripe_webhook(request: Request, engine: EngineDep) -> JSONResponse:
    """Stripe events, verified with `Stripe-Signature` against
    TOLLGATE_STRIPE_WEBHOOK_SECRET; each event id is applied once. Never answers 5xx."""
    settings = get_settings()
    body = await request.body()
    try:
        event = stripe_events.verify(
            body, request.headers.get("Stripe-Signature"), settings.stripe_webhook_secret
        )
    except stripe_events.WebhookRejected as exc:
        _count(request, "stripe", "", "rejected")
        return JSONResponse({"detail": str(exc)}, status_code=400)
    try:
        outcome = await run_in_threadpool(
            stripe_events.handle, engine, event, settings.credit_packs
        )
    except stripe_events.WebhookRejected as exc:
        _count(request, "stripe", event["type"], "rejected")
        return JSONResponse({"detail": str(exc)}, status_code=400)
    except Exception:  # the database is down, a bug: Stripe retries a 400 too
        log.exception("stripe event %s (%s) failed", event["id"], event["type"])
        _count(request, "stripe", event["type"], "failed")
        return JSONResponse(
            {"detail": "the event could not be processed now; retry later"}, status_code=400
        )
    _count(request, "stripe", event["type"], outcome.outcome)
    return JSONResponse(
        {"received": True, "id": event["id"], "outcome": outcome.outcome, "detail": outcome.detail}
    )


@router.get("/alerts", response_model=AlertsOut, responses={200: ALERTS_OK, **ERRORS})
def get_alerts(account_id: AccountId, engine: EngineDep) -> dict[str, Any]:
    """Your low-balance thresholds per kind, whether each is armed, and the webhook URL."""
    return run_transaction(engine, lambda conn: alerts.view(conn, account_id))


@router.put("/alerts", response_model=AlertsOut, responses={200: ALERTS_OK, **ERRORS})
def put_alerts(body: AlertsIn, account_id: AccountId, engine: EngineDep) -> dict[str, Any]:
    """Set thresholds (null removes one) and optionally the webhook URL that receives one
    signed `balance.low` event each time `available` falls below a threshold."""
    return set_from_body(engine, account_id, body)


def set_from_body(engine: Any, account_id: str, body: AlertsIn) -> dict[str, Any]:
    url = body.webhook_url if "webhook_url" in body.model_fields_set else alerts.UNSET
    return alerts.set_alerts(engine, account_id, dict(body.thresholds), url)
