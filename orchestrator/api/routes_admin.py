"""Operator routes: accounts and credit grants (Bearer TOLLGATE_ADMIN_TOKEN)."""

from __future__ import annotations

import contextlib
from typing import Any, Final, Literal

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field

from billing import ledger
from billing.db import run_transaction
from orchestrator import accounts
from orchestrator.api.deps import Admin, EngineDep
from orchestrator.api.schemas import AccountIn, AccountOut, ErrorOut, GrantIn, GrantOut
from orchestrator.scheduling import queues
from orchestrator.scheduling.dispatch import get_publisher
from orchestrator.scheduling.outbox import relay
from orchestrator.scheduling.scheduler import nudge
from orchestrator.settlement import retention
from orchestrator.tunes import service as tunes

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Admin])

ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    401: {"model": ErrorOut, "description": "missing or bad admin token"},
    403: {"model": ErrorOut, "description": "admin routes disabled (no TOLLGATE_ADMIN_TOKEN)"},
    422: {"model": ErrorOut, "description": "bad input; `field` names it"},
}


@router.post(
    "/accounts",
    response_model=AccountOut,
    status_code=status.HTTP_201_CREATED,
    responses=ERRORS,
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
        **ERRORS,
        200: {"model": GrantOut, "description": "this reference was already granted"},
        404: {"model": ErrorOut, "description": "unknown account"},
        409: {"model": ErrorOut, "description": "reference already used for another grant"},
    },
)
def grant_credits(
    account_id: str, body: GrantIn, engine: EngineDep, response: Response
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
    responses={**ERRORS, 404: {"model": ErrorOut, "description": "unknown account"}},
)
def set_limits(account_id: str, body: LimitsIn, engine: EngineDep) -> dict[str, Any]:
    """Override the account's running cap (every queue); takes effect at the next dispatch."""
    return queues.set_running_cap(engine, account_id, body.running_cap)


@router.get("/queue", responses=ERRORS)
def queue_overview(engine: EngineDep) -> dict[str, Any]:
    """Per queue: live slots and workers, running, queued, the top accounts by queued jobs."""
    return queues.overview(engine, get_publisher().redis)


class PlanIn(BaseModel):
    plan: Literal["free", "standard", "business"]


@router.post("/accounts/{account_id}/plan", responses={**ERRORS, 404: {"model": ErrorOut}})
def change_plan(account_id: str, body: PlanIn, engine: EngineDep) -> dict[str, str]:
    """Change an account's plan; recomputes its tunes' expiry (a lapse starts the clock)."""
    retention.set_plan(engine, account_id, body.plan)
    return {"id": account_id, "plan": body.plan}
