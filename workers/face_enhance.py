"""Celery task for face_enhance jobs (queue from orchestrator.families)."""

from __future__ import annotations

from typing import Any

from workers.app import app
from workers.runtime import run_job


@app.task(name="tollgate.face_enhance", bind=True)
def face_enhance(self: Any, job_id: str) -> dict[str, Any]:
    return run_job(self, "face_enhance", job_id)
