"""What every family's task does: run the job through orchestrator.execution.protocol with the
family's runner. Runners are looked up by job type, so a test worker can register its own
behaviours without touching the product's tasks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from celery import Task

from orchestrator.db import get_engine
from orchestrator.events import append_event
from orchestrator.execution.protocol import JOB_PHASE, Phase, Runner, execute
from orchestrator.scheduling.dispatch import get_publisher
from orchestrator.scheduling.scheduler import nudge
from orchestrator.scheduling.slots import record_run
from orchestrator.storage import get_storage

_runners: dict[str, Runner] = {}
_factories: dict[str, Callable[[], Runner]] = {}


def register(job_type: str, factory: Callable[[], Runner]) -> None:
    """Declare how to build the runner for `job_type` (built once per worker process)."""
    _factories[job_type] = factory
    _runners.pop(job_type, None)


def runner_for(job_type: str) -> Runner:
    if job_type not in _runners:
        _runners[job_type] = _factories[job_type]()
    return _runners[job_type]


def run_job(task: Task, job_type: str, job_id: str, phase: Phase = JOB_PHASE) -> dict[str, Any]:
    engine, publisher = get_engine(), get_publisher()

    def on_progress(step: int, total: int) -> None:
        with contextlib.suppress(Exception):  # best effort: the job row has the truth
            append_event(
                publisher.redis,
                {
                    "job_id": job_id,
                    "type": job_type,
                    "status": "running",
                    "step": step,
                    "total": total,
                },
            )

    started = time.monotonic()
    result = execute(
        engine,
        get_storage(),
        job_id,
        task.request.hostname or "worker",
        # Looked up inside the run, so a runner that cannot be built fails (and refunds) the job.
        lambda ctx: runner_for(job_type)(ctx),
        on_progress,
        phase,
    )
    if result.get("status") != "skipped":
        with contextlib.suppress(Exception):  # an estimate for queue ETAs only
            record_run(publisher.redis, job_type, time.monotonic() - started)
    nudge(engine, publisher, job_id)  # a slot is free: dispatch the next job
    return result
