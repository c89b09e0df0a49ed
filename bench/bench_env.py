"""What a bench's processes need: fresh secrets (the API, intake and workers refuse to start
with an empty or default callback secret, and the API with a default output-URL secret),
and funded accounts."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import Engine

from billing import ledger
from billing.db import run_transaction
from orchestrator import accounts
from orchestrator.settings import new_webhook_secret


def bench_secrets() -> dict[str, str]:
    return {
        "TOLLGATE_CALLBACK_SECRET": new_webhook_secret(),
        "TOLLGATE_OUTPUT_URL_SECRET": secrets.token_hex(32),
    }


def funded_accounts(engine: Engine, n: int, credits: int) -> list[Any]:
    """`n` new business accounts (with their API keys), each granted `credits` image
    credits."""
    created = [accounts.create_account(engine, "bench", "business") for _ in range(n)]
    for acct in created:
        run_transaction(
            engine,
            lambda c, a=acct: ledger.grant(
                c, a.id, "image", credits, source="adjustment", reference=f"bench-{a.id}"
            ),
        )
    return created
