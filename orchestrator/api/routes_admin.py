"""Operator routes: accounts and credit grants (Bearer TOLLGATE_ADMIN_TOKEN)."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, Response, status
from pydantic import BaseModel

from billing import ledger
from billing.db import run_transaction
from orchestrator import accounts, retention, tunes
from orchestrator.api.deps import Admin, EngineDep
from orchestrator.api.docs import account_id_param, ok, responses
from orchestrator.api.schemas import AccountIn, AccountOut, GrantIn, GrantOut
from orchestrator.dispatch import get_publisher
from orchestrator.outbox import relay

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Admin])

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
    granted = run_transaction(
        engine,
        lambda conn: ledger.grant(
            conn,
            account_id,
            body.kind,
            body.amount,
            source=body.source,
            reference=body.reference,
            expires_at=body.expires_at,
        ),
    )
    if not granted.created:
        response.status_code = status.HTTP_200_OK
    elif body.kind == "tune_image":
        tunes.start_waiting_renders(engine, account_id)  # trained tunes waiting for credits
        relay_quietly_all(engine)
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
        relay(engine, get_publisher())


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
