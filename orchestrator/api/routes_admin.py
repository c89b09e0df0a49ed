"""Operator routes: accounts and credit grants (Bearer TOLLGATE_ADMIN_TOKEN)."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, Path, Response, status
from pydantic import BaseModel, Field
from sqlalchemy import select

from billing import ledger
from billing.db import run_transaction
from billing.tables import grants
from orchestrator import accounts
from orchestrator.api.deps import Admin, EngineDep
from orchestrator.api.docs import account_id_param, error, ok, responses
from orchestrator.api.routes_billing import set_from_body
from orchestrator.api.schemas import (
    AccountIn,
    AccountOut,
    AlertsIn,
    AlertsOut,
    GrantIn,
    GrantOut,
    VoidIn,
    VoidOut,
)
from orchestrator.api.unavailable import UNAVAILABLE_RESPONSES
from orchestrator.payments import purchases
from orchestrator.scheduling import queues
from orchestrator.scheduling.dispatch import get_publisher
from orchestrator.scheduling.outbox import relay
from orchestrator.scheduling.scheduler import nudge
from orchestrator.settlement import alerts, retention

router = APIRouter(
    prefix="/v1", tags=["admin"], dependencies=[Admin], responses=UNAVAILABLE_RESPONSES
)

ERRORS: Final = responses(401, 403, e401="missing or bad admin token")
AccountIdPath = Annotated[str, Depends(account_id_param)]
GRANT_EXAMPLE: Final = {
    "id": 7,
    "account_id": "acc_0123456789abcdef01234567",
    "kind": "image",
    "amount": 100,
    "reference": "order-1234",
    "created": True,
}


@router.post(
    "/accounts",
    response_model=AccountOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        201: ok(
            AccountOut,
            "created",
            {"id": "acc_0123456789abcdef01234567", "api_key": "tg_Xq3v...shown-once"},
        ),
        **ERRORS,
    },
)
def create_account(body: AccountIn, engine: EngineDep) -> dict[str, str]:
    """Create an account and its API key (shown once)."""
    new = accounts.create_account(engine, body.name, body.plan)
    return {"id": new.id, "api_key": new.api_key}


@router.post(
    "/accounts/{account_id}/grants",
    response_model=GrantOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        201: ok(GrantOut, "granted", GRANT_EXAMPLE),
        200: ok(
            GrantOut, "this reference was already granted", {**GRANT_EXAMPLE, "created": False}
        ),
        **ERRORS,
        **responses(
            404,
            409,
            e404="unknown account",
            e409="reference already used for another grant",
        ),
    },
)
def grant_credits(
    account_id: AccountIdPath, body: GrantIn, engine: EngineDep, response: Response
) -> dict[str, Any]:
    """Add credits. Idempotent on `reference` (201 the first time, 200 after)."""

    def work(conn: Any) -> ledger.Grant:
        granted = ledger.grant(
            conn,
            account_id,
            body.kind,
            body.amount,
            source=body.source,
            reference=body.reference,
            expires_at=body.expires_at,
        )
        alerts.check(conn, account_id, body.kind)  # a top-up re-arms
        return granted

    granted = run_transaction(engine, work)
    if not granted.created:
        response.status_code = status.HTTP_200_OK
    else:  # trained tunes waiting for tune_image credits start rendering
        purchases.credits_arrived(engine, account_id, {body.kind})
    return {
        "id": granted.id,
        "account_id": granted.account_id,
        "kind": granted.kind,
        "amount": granted.amount,
        "reference": granted.reference,
        "created": granted.created,
    }


def relay_quietly_all(engine: Any) -> None:
    """Publish what a grant started (render dispatches); the re-publisher covers failures."""
    with contextlib.suppress(Exception):  # best effort, like every fast path
        nudge(engine, get_publisher())
        relay(engine, get_publisher())


class LimitsIn(BaseModel):
    # Running jobs per queue for this account; null: back to its plan's cap.
    running_cap: int | None = Field(ge=0, le=queues.RUNNING_CAP_MAX)


class LimitsOut(BaseModel):
    account_id: str
    plan: str
    running_cap: int


@router.post(
    "/accounts/{account_id}/limits",
    response_model=LimitsOut,
    responses={
        200: ok(
            LimitsOut,
            "the account's cap override",
            {"account_id": "acc_0123", "plan": "free", "running_cap": 4},
        ),
        **ERRORS,
        404: error(404, "unknown account"),
    },
)
def set_limits(account_id: AccountIdPath, body: LimitsIn, engine: EngineDep) -> dict[str, Any]:
    """Override the account's running cap (every queue); a dispatch follows at once, so a
    raised cap takes effect now."""
    out = queues.set_running_cap(engine, account_id, body.running_cap)
    with contextlib.suppress(Exception):  # best effort: beat dispatches within a second
        nudge(engine, get_publisher())
    return out


@router.get(
    "/queue",
    responses={
        200: {
            "description": "per queue: live slots, running, queued, top accounts",
            "content": {
                "application/json": {
                    "example": {
                        "queues": [
                            {
                                "queue": "gpu.txt2img",
                                "live_slots": 4,
                                "running": 3,
                                "queued": 12,
                                "top_accounts": [{"account_id": "acc_0123", "queued": 9}],
                            }
                        ]
                    }
                }
            },
        },
        **ERRORS,
    },
)
def queue_overview(engine: EngineDep) -> dict[str, Any]:
    """Per queue: live slots and workers, running, queued, the top accounts by queued jobs."""
    return queues.overview(engine, get_publisher().redis)


class PlanIn(BaseModel):
    plan: Literal["free", "standard", "business"]


class PlanOut(BaseModel):
    id: str
    plan: str


@router.post(
    "/accounts/{account_id}/plan",
    response_model=PlanOut,
    responses={
        200: ok(PlanOut, "changed", {"id": GRANT_EXAMPLE["account_id"], "plan": "standard"}),
        **ERRORS,
        **responses(404, e404="unknown account"),
    },
)
def change_plan(account_id: AccountIdPath, body: PlanIn, engine: EngineDep) -> dict[str, str]:
    """Change an account's plan; recomputes its tunes' expiry (a lapse starts the clock)."""
    retention.set_plan(engine, account_id, body.plan)
    return {"id": account_id, "plan": body.plan}


@router.post(
    "/accounts/{account_id}/grants/{reference}/void",
    response_model=VoidOut,
    responses={
        200: ok(
            VoidOut,
            "what was voided now, what waits for holds, and the shortfall",
            {
                "reference": "stripe:cs_1:price_img_100",
                "account_id": "acc_0123",
                "kind": "image",
                "requested": 50,
                "voided": 40,
                "shortfall": 10,
                "total_voided": 40,
                "total_shortfall": 10,
            },
        ),
        **ERRORS,
        404: error(404, "unknown grant (for this account)"),
    },
)
def void_grant(
    account_id: AccountIdPath,
    reference: Annotated[str, Path(max_length=200)],
    engine: EngineDep,
    body: VoidIn | None = None,
) -> Any:
    """Void a grant's credits, all that is left (no body, or no `amount`) or `amount` of
    them. Only the free remainder goes now; held credits are voided when their hold gives
    them back; spent or expired ones are the `shortfall`."""
    amount = body.amount if body is not None else None

    def work(conn: Any) -> ledger.Void:
        found = conn.execute(
            select(grants.c.account_id).where(grants.c.reference == reference)
        ).scalar_one_or_none()
        if found != account_id:
            raise ledger.UnknownGrant(reference)
        return purchases.void_grant(conn, reference, amount)

    done = run_transaction(engine, work)
    relay_quietly_all(engine)  # the grant.voided event (and a balance.low webhook)
    return {
        "reference": done.reference,
        "account_id": done.account_id,
        "kind": done.kind,
        "requested": done.requested,
        "voided": done.voided,
        "shortfall": done.shortfall,
        "total_voided": done.total_voided,
        "total_shortfall": done.total_shortfall,
    }


@router.put(
    "/accounts/{account_id}/alerts",
    response_model=AlertsOut,
    responses={
        200: ok(
            AlertsOut,
            "the account's thresholds, armed flags and webhook URL",
            {"webhook_url": None, "thresholds": {"image": 10}, "armed": {"image": True}},
        ),
        **ERRORS,
        404: error(404, "unknown account"),
    },
)
def put_account_alerts(
    account_id: AccountIdPath, body: AlertsIn, engine: EngineDep
) -> dict[str, Any]:
    """An account's low-balance thresholds and webhook URL (as PUT /v1/alerts)."""
    return set_from_body(engine, account_id, body)
