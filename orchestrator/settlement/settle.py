"""Settlement: end a job once, committing its hold for what was delivered or releasing it.
A job family (tunes) may settle its phases its own way; it registers that in jobs.kinds."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Row

from billing import ledger
from orchestrator.jobs import kinds
from orchestrator.jobs.records import transition
from orchestrator.settlement import alerts


def settle(
    conn: Connection,
    row: Row[Any],
    status: str,
    delivered: int,
    now: datetime,
    error: str | None = None,
) -> Row[Any]:
    """End a job: commit the hold for `delivered` outputs (at most the price) or release it.
    The ledger resolves a hold once; the caller holds the job's row lock."""
    charge = min(row.price, row.price_per_output * delivered)
    hold = ledger.get_hold(conn, row.id)
    if hold is not None and hold.status == "open":
        hold = (
            ledger.commit(conn, row.id, charge, now=now)
            if charge
            else ledger.release(conn, row.id, now=now)
        )
        alerts.check(conn, row.account_id, row.credit_kind, now, row.id)
    charged = hold.committed if hold is not None else 0
    return transition(
        conn,
        row.id,
        status,
        now,
        current=row.status,
        charged=charged,
        refunded=row.price - charged,
        error=error,
    )


def settler_for(row: Row[Any]) -> Any:
    """How to settle this job in its current phase (tunes have their own)."""
    kind = kinds.kind_for(row.type)
    if kind.settler_for is not None:
        return kind.settler_for(row)
    return settle
