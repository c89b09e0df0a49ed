"""Tune retention by plan: when trained weights are deleted, plan changes, and the sweeper.

A free plan's weights are deleted `tune_retention_free_days` after training; standard and
business keep them while the plan is active, then `tune_retention_lapsed_days` after it lapses.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import Connection, Engine, select, update

from billing import ledger
from billing.clock import utcnow
from billing.db import run_transaction
from billing.tables import accounts
from orchestrator.jobs import states
from orchestrator.jobs.records import lock_job, transition
from orchestrator.settings import get_settings
from orchestrator.storage import Storage
from orchestrator.tables import tunes
from orchestrator.tunes.checkpoints import checkpoint_key

PAID_PLANS: Final = ("standard", "business")


def expires_at_for(plan: str, lapsed_at: datetime | None, trained_at: datetime) -> datetime | None:
    """When a trained tune's weights are deleted (None: kept while the plan is paid)."""
    settings = get_settings()
    if plan in PAID_PLANS:
        return None
    if lapsed_at is not None:
        start = max(trained_at, lapsed_at)
        return start + timedelta(days=settings.tune_retention_lapsed_days)
    return trained_at + timedelta(days=settings.tune_retention_free_days)


def set_plan(engine: Engine, account_id: str, plan: str, now: datetime | None = None) -> None:
    """Change an account's plan and recompute its tunes' expiry. Leaving a paid plan starts
    the lapse clock; returning to one stops it."""
    run_transaction(engine, lambda conn: apply_plan(conn, account_id, plan, now or utcnow()))


def apply_plan(conn: Connection, account_id: str, plan: str, at: datetime) -> None:
    """set_plan in the caller's transaction; `at` is when a lapse starts the clock."""
    account = ledger.get_account(conn, account_id)
    if plan not in ledger.PLANS:
        raise ledger.InvalidAmount("plan", f"must be one of {', '.join(ledger.PLANS)}")
    lapsed = account.plan_lapsed_at
    if plan in PAID_PLANS:
        lapsed = None
    elif account.plan in PAID_PLANS:
        lapsed = at
    conn.execute(
        update(accounts)
        .where(accounts.c.id == account_id)
        .values(plan=plan, plan_lapsed_at=lapsed, plan_lapses_at=None)
    )
    for tune in conn.execute(
        select(tunes).where(
            tunes.c.account_id == account_id,
            tunes.c.trained_at.is_not(None),
            tunes.c.weights_deleted_at.is_(None),
        )
    ):
        conn.execute(
            update(tunes)
            .where(tunes.c.id == tune.id)
            .values(expires_at=expires_at_for(plan, lapsed, tune.trained_at))
        )


def sweep_expired(
    engine: Engine, storage: Storage, now: datetime | None = None, limit: int = 100
) -> list[str]:
    """Beat: delete the weights (and any leftover training checkpoint) of tunes past their
    expiry and mark them expired."""
    at = now or utcnow()
    due = run_transaction(
        engine,
        lambda c: list(
            c.execute(
                select(tunes.c.id)
                .where(tunes.c.expires_at <= at, tunes.c.weights_deleted_at.is_(None))
                .order_by(tunes.c.expires_at)
                .limit(limit)
            ).scalars()
        ),
    )
    swept = []
    for tune_id in due:

        def work(conn: Connection, tune_id: str = tune_id) -> str | None:
            tune = _tune(conn, tune_id)
            row = lock_job(conn, tune_id)
            if tune.weights_deleted_at is not None or row.status == states.RENDERING:
                return None  # a render in flight finishes first
            conn.execute(update(tunes).where(tunes.c.id == tune_id).values(weights_deleted_at=at))
            if row.status in (states.SUCCEEDED, states.AWAITING_CREDITS):
                transition(
                    conn,
                    tune_id,
                    states.EXPIRED,
                    at,
                    error="tune weights deleted after the retention period",
                )
            return str(tune.lora_key) if tune.lora_key else ""

        key = run_transaction(engine, work)
        if key is not None:
            if key:
                storage.delete(key)
            storage.delete(checkpoint_key(tune_id))  # a leftover of training, if any
            swept.append(tune_id)
    return swept


def _tune(conn: Connection, tune_id: str):  # type: ignore[no-untyped-def]
    return conn.execute(select(tunes).where(tunes.c.id == tune_id)).one()
