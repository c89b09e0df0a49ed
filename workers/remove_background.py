"""Celery task for remove_background jobs (queue from orchestrator.families)."""

from __future__ import annotations

from typing import Any

from workers.app import app
from workers.runtime import run_job


@app.task(name="tollgate.remove_background", bind=True)
def remove_background(self: Any, job_id: str) -> dict[str, Any]:
    return run_job(self, "remove_background", job_id)
