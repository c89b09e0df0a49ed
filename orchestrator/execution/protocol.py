"""Running a job on a worker, safely under duplicate delivery and crashes.

Protocol (each step its own transaction, under the job's row lock):
1. `begin` (orchestrator.execution.start): a delivery takes the job: a new attempt number
   and a lease token with an expiry (orchestrator.execution.leases), renewed by a heartbeat
   thread while the runner works. A job that has already ended, or whose lease another
   attempt holds, is left alone (a duplicate delivery: no-op). A `running` job whose lease
   expired, or whose holder was a process of this worker that is gone, is taken over.
2. The runner reports progress per step (`RunContext.progress`, orchestrator.execution.context):
   every call checks the lease and the cancel flag, so a superseded or canceled run stops at
   its next step. Outputs are stored as they are delivered and recorded on the job with the
   next throttled progress write, or at the latest by `finish`.
3. `finish` (orchestrator.execution.result): record what is still unrecorded and settle
   once. Only the current attempt, on a job that has not ended, is applied; anything else is
   recorded in job_results as late and charges nothing.

A plain job therefore costs two durable transactions on the worker (`begin` does not wait
for its WAL flush: losing it loses only a lease, see `commit_without_flush_wait`), plus a
lease and cancel read at most every PROGRESS_CHECK_INTERVAL_S and a progress write at most
every PROGRESS_WRITE_INTERVAL_S. On PostgreSQL
the usual `begin` and `finish` are one PL/pgSQL call each (migration 0011).

Transient database faults (docs/architecture.md, "Transient faults") never fail a job: a
progress write or lease check that cannot reach the database is skipped (the run goes on,
the next write carries the figures), `begin` and `finish` are retried (finish for up to
FINISH_RETRY_BUDGET_S), and each step recognises on a rerun that its commit already went
through. A fault that outlasts those budgets escapes `execute` as the database error; the
task then retries the delivery (workers.runtime).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from billing.clock import utcnow
from billing.db import is_transient
from orchestrator.execution.attempt import FINISH_RETRY_BUDGET_S as FINISH_RETRY_BUDGET_S
from orchestrator.execution.attempt import JOB_PHASE as JOB_PHASE
from orchestrator.execution.attempt import (
    PROGRESS_CHECK_INTERVAL_S as PROGRESS_CHECK_INTERVAL_S,
)
from orchestrator.execution.attempt import (
    PROGRESS_WRITE_INTERVAL_S as PROGRESS_WRITE_INTERVAL_S,
)
from orchestrator.execution.attempt import Attempt as Attempt
from orchestrator.execution.attempt import JobStopped as JobStopped
from orchestrator.execution.attempt import Phase as Phase
from orchestrator.execution.context import RunContext as RunContext
from orchestrator.execution.finisher import FINISHING as FINISHING
from orchestrator.execution.finisher import Work
from orchestrator.execution.heartbeat import Heartbeat
from orchestrator.execution.leases import ATTEMPTS_MAX as ATTEMPTS_MAX  # re-exported
from orchestrator.execution.result import finish as finish
from orchestrator.execution.start import begin as begin
from orchestrator.execution.start import seconds_between
from orchestrator.jobs import states
from orchestrator.settings import get_settings
from orchestrator.storage import Storage

log = logging.getLogger(__name__)

Runner = Callable[[RunContext], None]


def execute(
    engine: Engine,
    storage: Storage,
    job_id: str,
    worker: str,
    runner: Runner,
    on_progress: Callable[[int, int], None] | None = None,
    phase: Phase = JOB_PHASE,
    on_started: Callable[[], None] | None = None,
    hand_finish: Callable[[Work], None] | None = None,
    on_finished: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The whole worker side of a job. Safe to call twice for the same job.

    With `hand_finish` (a worker's finisher: orchestrator.execution.finisher), applying the
    result (`finish`, then the heartbeat's stop) is handed to it once the runner is done, and
    this returns at once with status FINISHING; `on_finished` then gets the final answer on
    the finisher's thread. Without it, `finish` runs here and `on_finished` before the
    return."""
    attempt = begin(engine, job_id, worker, phase)
    if attempt is None:
        return {"job_id": job_id, "status": "skipped"}
    if attempt.start_webhook and on_started is not None:
        on_started()
    heartbeat = Heartbeat(
        engine, job_id, attempt.token, get_settings().lease_renew_interval_s
    ).start()
    handed = False
    try:
        ctx = RunContext(engine, storage, attempt, on_progress, heartbeat)
        outcome, error = _run(attempt, runner, ctx)

        def apply() -> dict[str, Any]:
            # Through an outage, keep trying for as long as the lease is surely held, and
            # at least FINISH_RETRY_BUDGET_S: a result applied after the sweep took the job
            # back is recorded as late and charges nothing, so trying longer is never wrong.
            nonlocal outcome, error
            try:
                try:
                    ctx.flush_outputs()  # what is charged is on disk first
                except OSError as exc:
                    log.error("job %s: outputs not flushed to storage: %s", job_id, exc)
                    ctx.withdraw_unflushed(f"storage: {exc}"[:200])
                    if outcome == states.SUCCEEDED:
                        outcome, error = states.FAILED, f"outputs not stored: {exc}"[:500]
                budget_s = max(FINISH_RETRY_BUDGET_S, heartbeat.held_until - time.monotonic())
                status = finish(engine, attempt, outcome, error, phase, ctx, budget_s=budget_s)
            finally:
                heartbeat.stop()  # after finish: the lease is held until the result is applied
            result = _result(attempt, status)
            if on_finished is not None:
                on_finished(result)
            return result

        if hand_finish is None:
            return apply()
        hand_finish(apply)
        handed = True
        return {"job_id": job_id, "status": FINISHING, "job_type": attempt.spec.get("type")}
    finally:
        if not handed:
            heartbeat.stop()


def _run(attempt: Attempt, runner: Runner, ctx: RunContext) -> tuple[str, str | None]:
    """Run the runner: the outcome to apply and its error. A transient database fault
    escapes (not the job's failure: its lease lapses and the sweep dispatches it again)."""
    try:
        runner(ctx)
    except JobStopped as stop:
        if stop.reason == "superseded":
            return states.FAILED, "superseded by a newer attempt"
        return states.CANCELED, "canceled by the client"
    except Exception as exc:
        if is_transient(exc):
            # The runner's own database call hit an outage: not the job's failure. The job
            # stays running; once this lease lapses, the lease sweep dispatches it again.
            log.warning("job %s: database unreachable inside the runner: %s", attempt.job_id, exc)
            raise
        log.exception("job %s failed", attempt.job_id)
        return states.FAILED, _reason(exc)
    return states.SUCCEEDED, None


def _result(attempt: Attempt, status: str) -> dict[str, Any]:
    """The task's return value; the timings feed workers.metrics' latency histograms."""
    result: dict[str, Any] = {"job_id": attempt.job_id, "status": status}
    result["job_type"] = attempt.spec.get("type")
    result["queue_wait_s"] = attempt.queue_wait_s
    if states.is_terminal(status) and attempt.created_at is not None:
        result["latency_s"] = seconds_between(attempt.created_at, utcnow())
    return result


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:500]
