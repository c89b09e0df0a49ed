"""What every family's task does: run the job through orchestrator.execution.protocol with the
family's runner. Runners are looked up by job type, so a test worker can register its own
behaviours without touching the product's tasks."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from celery import Task
from celery.signals import worker_process_shutdown, worker_shutdown

from orchestrator.db import get_engine
from orchestrator.events import append_event
from orchestrator.execution.finisher import current_finisher, process_finisher
from orchestrator.execution.progress_webhooks import ProgressWebhooks
from orchestrator.execution.protocol import JOB_PHASE, Phase, Runner, execute
from orchestrator.faults import dependency_of
from orchestrator.scheduling.dispatch import get_publisher
from orchestrator.scheduling.nudger import Nudger
from orchestrator.scheduling.slots import record_runs
from orchestrator.settings import get_settings
from orchestrator.storage import get_storage
from workers import metrics

log = logging.getLogger(__name__)

# A delivery that a database outage stopped (begin or finish past its retry budget) is sent
# again this many times, this long apart (seconds); the rerun recognises what already
# happened (a begun job is taken over, an ended one is skipped).
FAULT_RETRIES_MAX: Final = 10
FAULT_RETRY_COUNTDOWN_S: Final = 5
# At a worker's shutdown its last jobs' nudges get this long; what is left then, beat's
# periodic dispatcher and re-publisher send (a delay, never a loss).
NUDGER_STOP_TIMEOUT_S: Final = 5.0
# ... and the results its finisher still holds this long (what is left: the lease sweep).
FINISHER_STOP_TIMEOUT_S: Final = 20.0
RUNS_PENDING_MAX: Final = 1000  # run times waiting for the nudger's thread (beyond: dropped)

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


_nudger: Nudger | None = None
_nudger_pid = 0


def post_job_nudger() -> Nudger:
    """This process's nudger for the dispatch + relay after a job's end. Made (and its
    thread started, at its first poke) in the process that uses it: a prefork pool child
    never shares its parent's lock, queue or thread."""
    global _nudger, _nudger_pid
    if _nudger is None or _nudger_pid != os.getpid():
        interval_s = get_settings().sched_worker_pass_interval_s
        _nudger = Nudger(get_engine, get_publisher, pass_interval_s=interval_s)
        _nudger_pid = os.getpid()
    return _nudger


@worker_process_shutdown.connect(weak=False)
@worker_shutdown.connect(weak=False)
def stop_post_job_nudger(**_: Any) -> None:
    """A pool child's (or a solo worker's) last results and passes before it exits."""
    finisher = current_finisher()
    if finisher is not None:
        with contextlib.suppress(Exception):
            finisher.stop(FINISHER_STOP_TIMEOUT_S)
    if _nudger is not None and _nudger_pid == os.getpid():
        with contextlib.suppress(Exception):
            _nudger.stop(NUDGER_STOP_TIMEOUT_S)


_runs: list[tuple[str, float]] = []  # run times not yet sent (guarded by _runs_lock)
_runs_lock = threading.Lock()
_runs_chore = False  # a chore that sends them is waiting on the nudger's thread


def _note_run(nudger: Nudger, redis: Any, job_type: str, run_s: float) -> None:
    global _runs_chore
    with _runs_lock:
        if len(_runs) < RUNS_PENDING_MAX:
            _runs.append((job_type, run_s))
        if _runs_chore:
            return  # the waiting chore sends this one too
        _runs_chore = True
    if not nudger.defer(lambda: _send_runs(redis)):
        with _runs_lock:
            _runs_chore = False  # not taken (full, or stopping): the next run asks again


def _send_runs(redis: Any) -> None:
    global _runs_chore
    with _runs_lock:
        runs = list(_runs)
        _runs.clear()
        _runs_chore = False
    record_runs(redis, runs)


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
    # The result is applied on this process's finisher thread while this one takes its
    # next task (orchestrator.execution.finisher), unless configured off.
    handed = get_settings().worker_finish_in_background
    task_id, task_name = task.request.id, task.name

    def on_finished(result: dict[str, Any]) -> None:
        nudger = post_job_nudger()
        if result.get("status") != "skipped":
            # An estimate for queue ETAs and dispatch buffers only, from the task's start to
            # its result applied (the slot's occupancy): sent on the nudger's thread, the
            # runs of a pass interval in one round trip.
            _note_run(nudger, publisher.redis, job_type, time.monotonic() - started)
        # A slot is free: dispatch the next job and relay this one's outbox rows, on this
        # process's nudger thread, so the task returns (and is acked) without waiting.
        nudger.poke(job_id)
        if handed:
            metrics.job_finished(task_id, task_name, result)

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
            # The `running` event (and a `started` webhook) goes out on this process's
            # nudger thread within one pass interval: a short job's end shares that pass.
            on_started=lambda: post_job_nudger().relay(job_id),
            hand_finish=process_finisher().hand if handed else None,
            on_finished=on_finished,
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
    if result.get("status") == "skipped":  # nothing ran (on_finished was not called)
        post_job_nudger().poke(job_id)
    return result
