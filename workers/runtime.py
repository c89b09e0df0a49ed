"""What every family's task does: run the job through orchestrator.execution.protocol with the
family's runner. Runners are looked up by job type, so a test worker can register its own
behaviours without touching the product's tasks."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from celery import Task

from orchestrator.db import get_engine
from orchestrator.events import append_event
from orchestrator.execution.progress_webhooks import ProgressWebhooks
from orchestrator.execution.protocol import JOB_PHASE, Phase, Runner, execute
from orchestrator.faults import dependency_of
from orchestrator.scheduling.dispatch import get_publisher
from orchestrator.scheduling.outbox import relay_quietly
from orchestrator.scheduling.scheduler import nudge
from orchestrator.scheduling.slots import record_run
from orchestrator.storage import get_storage

log = logging.getLogger(__name__)

# A delivery that a database outage stopped (begin or finish past its retry budget) is sent
# again this many times, this long apart (seconds); the rerun recognises what already
# happened (a begun job is taken over, an ended one is skipped).
FAULT_RETRIES_MAX: Final = 10
FAULT_RETRY_COUNTDOWN_S: Final = 5

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
    hooks = ProgressWebhooks(engine, publisher, job_id)

    def on_progress(step: int, total: int) -> None:
        with contextlib.suppress(Exception):  # best effort, like the event below
            hooks(step, total)
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
    try:
        result = execute(
            engine,
            get_storage(),
            job_id,
            task.request.hostname or "worker",
            # Looked up inside the run, so a runner that cannot be built fails (and refunds)
            # the job.
            lambda ctx: runner_for(job_type)(ctx),
            on_progress,
            phase,
            on_started=lambda: relay_quietly(engine, publisher, job_id),
        )
    except Exception as exc:
        dependency = dependency_of(exc)
        if dependency is None:
            raise
        # Not the job's failure. Send the delivery again (acks_late: this one is acked once
        # the retry is published). If even that fails, the task fails and the job's lease
        # lapses: the lease sweep recovers it.
        log.warning(
            "job %s: %s unreachable past the retry budget; delivery retried in %d s",
            job_id,
            dependency,
            FAULT_RETRY_COUNTDOWN_S,
        )
        raise task.retry(
            exc=exc, countdown=FAULT_RETRY_COUNTDOWN_S, max_retries=FAULT_RETRIES_MAX
        ) from exc
    if result.get("status") != "skipped":
        with contextlib.suppress(Exception):  # an estimate for queue ETAs only
            record_run(publisher.redis, job_type, time.monotonic() - started)
    nudge(engine, publisher, job_id)  # a slot is free: dispatch the next job
    return result
