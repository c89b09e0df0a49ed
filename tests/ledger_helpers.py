"""Helpers for ledger tests: a fresh account per test keeps tests independent."""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlalchemy import Engine

from billing import ledger
from billing.db import run_transaction


def new_account(engine: Engine, plan: str = "free") -> str:
    return run_transaction(engine, lambda c: ledger.create_account(c, "test", plan))


def ref(prefix: str = "r") -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def grant(
    engine: Engine,
    account: str,
    amount: int,
    kind: str = "image",
    expires_at: datetime | None = None,
    now: datetime | None = None,
    reference: str | None = None,
) -> ledger.Grant:
    return run_transaction(
        engine,
        lambda c: ledger.grant(
            c,
            account,
            kind,
            amount,
            source="purchase",
            reference=reference or ref("g"),
            expires_at=expires_at,
            now=now,
        ),
    )


def available(
    engine: Engine, account: str, kind: str = "image", now: datetime | None = None
) -> int:
    return run_transaction(
        engine, lambda c: ledger.get_balance(c, account, kind, now=now)
    ).available
