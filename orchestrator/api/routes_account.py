"""The caller's credits: balances per kind and the ledger entries behind them."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Query
from sqlalchemy import Connection, select

from billing import ledger
from billing.db import run_transaction
from billing.tables import entries, grants, holds
from orchestrator.api.deps import AccountId, EngineDep
from orchestrator.api.schemas import BalanceOut, ErrorOut, LedgerPage
from orchestrator.api.unavailable import UNAVAILABLE_RESPONSES

router = APIRouter(prefix="/v1", tags=["account"], responses=UNAVAILABLE_RESPONSES)

LEDGER_LIMIT_MAX: Final = 200
ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    401: {"model": ErrorOut, "description": "missing or bad API key"},
    422: {"model": ErrorOut, "description": "bad input; `field` names it"},
}


@router.get("/balance", response_model=dict[str, BalanceOut], responses=ERRORS)
def balance(account_id: AccountId, engine: EngineDep) -> dict[str, dict[str, int]]:
    """Credits per kind: balance = held + available (expired grants not counted)."""
    found = run_transaction(engine, lambda conn: ledger.get_balances(conn, account_id))
    return {b.kind: {"balance": b.balance, "held": b.held, "available": b.available} for b in found}


def ledger_page(
    conn: Connection, account_id: str, limit: int, before: int | None
) -> dict[str, Any]:
    """One page of an account's entries, newest first; `next_before` continues it. Grant
    entries (grant, void, expire_grant) carry the grant's reference and source; hold entries
    (hold, commit, release, expire_hold) the hold's reference and the job it is for (a hold's
    reference is its job id, or `<job id>:render:<n>` for a tune's render)."""
    stmt = (
        select(
            entries.c.id,
            entries.c.kind,
            entries.c.type,
            entries.c.delta_balance,
            entries.c.delta_held,
            entries.c.created_at,
            grants.c.reference.label("grant_reference"),
            grants.c.source,
            holds.c.reference.label("hold_reference"),
        )
        .select_from(
            entries.outerjoin(grants, grants.c.id == entries.c.grant_id).outerjoin(
                holds, holds.c.id == entries.c.hold_id
            )
        )
        .where(entries.c.account_id == account_id)
        .order_by(entries.c.id.desc())
        .limit(limit + 1)
    )
    if before is not None:
        stmt = stmt.where(entries.c.id < before)
    rows = conn.execute(stmt).all()
    page = []
    for row in rows[:limit]:
        entry = row._asdict()
        grant_ref, hold_ref = entry.pop("grant_reference"), entry.pop("hold_reference")
        entry["reference"] = grant_ref or hold_ref
        entry["job_id"] = hold_ref.split(":render:")[0] if hold_ref else None
        page.append(entry)
    return {"entries": page, "next_before": page[-1]["id"] if len(rows) > limit else None}


@router.get("/ledger", response_model=LedgerPage, responses=ERRORS)
def ledger_entries(
    account_id: AccountId,
    engine: EngineDep,
    limit: Annotated[int, Query(ge=1, le=LEDGER_LIMIT_MAX)] = 50,
    before: Annotated[int | None, Query(ge=1, description="an entry id: older ones")] = None,
) -> dict[str, Any]:
    """Your ledger entries, newest first: grants (purchases, plan credits, ...), voids and
    expiries with their grant's reference; holds, commits and releases with their job id."""
    return run_transaction(engine, lambda conn: ledger_page(conn, account_id, limit, before))
