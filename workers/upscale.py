"""Celery task for upscale jobs (queue from orchestrator.families)."""

from __future__ import annotations

from typing import Any

from workers.app import app
from workers.runtime import run_job


@app.task(name="tollgate.upscale", bind=True)
def upscale(self: Any, job_id: str) -> dict[str, Any]:
    return run_job(self, "upscale", job_id)
