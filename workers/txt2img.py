"""Celery task for txt2img jobs (queue from orchestrator.families)."""

from __future__ import annotations

from typing import Any

from workers.app import app
from workers.runtime import run_job


@app.task(name="tollgate.txt2img", bind=True)
def txt2img(self: Any, job_id: str) -> dict[str, Any]:
    return run_job(self, "txt2img", job_id)
