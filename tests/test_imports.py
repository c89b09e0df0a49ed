"""billing stays free of Celery, FastAPI, torch and Redis (the design card's rule)."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("celery", "fastapi", "torch", "redis", "kombu", "starlette", "diffusers")


def test_billing_imports_no_service_or_model_libraries() -> None:
    code = (
        "import sys, billing, billing.ledger, billing.verify, billing.db, billing.pricing\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
