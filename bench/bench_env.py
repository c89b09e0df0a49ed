"""Fresh secrets for a bench's processes: the API, intake and workers refuse to start with
an empty or default callback secret (and the API with a default output-URL secret)."""

from __future__ import annotations

import secrets

from orchestrator.settings import new_webhook_secret


def bench_secrets() -> dict[str, str]:
    return {
        "TOLLGATE_CALLBACK_SECRET": new_webhook_secret(),
        "TOLLGATE_OUTPUT_URL_SECRET": secrets.token_hex(32),
    }
