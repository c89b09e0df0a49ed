"""The caller's credits: balances per kind and the ledger entries behind them."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Query
from sqlalchemy import Connection, select

from billing import ledger
from billing.db import run_transaction
from billing.tables import entries, grants, holds
from orchestrator.api.deps import AccountId, EngineDep
from orchestrator.api.docs import ok, responses
from orchestrator.api.schemas import BalanceOut, LedgerPage
from orchestrator.api.unavailable import UNAVAILABLE_RESPONSES

router = APIRouter(prefix="/v1", tags=["account"], responses=UNAVAILABLE_RESPONSES)

LEDGER_LIMIT_MAX: Final = 200
ENTRY_ID_MAX: Final = 2**63 - 1  # a bigint
BALANCE_EXAMPLE: Final = {
    "image": {"balance": 100, "held": 4, "available": 96},
    "tune": {"balance": 1, "held": 0, "available": 1},
    "tune_image": {"balance": 64, "held": 0, "available": 64},
}
LEDGER_EXAMPLE: Final = {
    "entries": [
        {
            "id": 42,
            "kind": "image",
            "type": "hold",
            "delta_balance": 0,
            "delta_held": 4,
            "created_at": "2026-01-01T12:00:00+00:00",
        }
    ],
    "next_before": None,
}


@router.get(
    "/balance",
    response_model=dict[str, BalanceOut],
    responses={
        200: ok(dict[str, BalanceOut], "credits per kind", BALANCE_EXAMPLE),
        **responses(401),
    },
)
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


@router.get(
    "/ledger",
    response_model=LedgerPage,
    responses={200: ok(LedgerPage, "one page, newest first", LEDGER_EXAMPLE), **responses(401)},
)
def ledger_entries(
    account_id: AccountId,
    engine: EngineDep,
    limit: Annotated[int, Query(ge=1, le=LEDGER_LIMIT_MAX)] = 50,
    before: Annotated[
        int | None, Query(ge=1, le=ENTRY_ID_MAX, description="an entry id: older ones")
    ] = None,
) -> dict[str, Any]:
    """Your ledger entries, newest first: grants (purchases, plan credits, ...), voids and
    expiries with their grant's reference; holds, commits and releases with their job id."""
    return run_transaction(engine, lambda conn: ledger_page(conn, account_id, limit, before))
