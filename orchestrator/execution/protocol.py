"""Running a job on a worker, safely under duplicate delivery and crashes.

Protocol (each step its own transaction, under the job's row lock):
1. `begin`: a delivery takes the job: a new attempt number and a lease token with an expiry
   (orchestrator.execution.leases), renewed by a heartbeat thread while the runner works. A job that
   has already ended, or whose lease another attempt holds, is left alone (a duplicate
   delivery: no-op). A `running` job whose lease expired, or whose holder was a process of
   this worker that is gone, is taken over.
2. The runner reports progress per step (`RunContext.progress`): every call checks the lease
   and the cancel flag, so a superseded or canceled run stops at its next step. Outputs are
   stored as they are delivered and recorded on the job with the next throttled progress
   write, or at the latest by `finish`.
3. `finish`: record what is still unrecorded and settle once. Only the current attempt, on a
   job that has not ended, is applied; anything else is recorded in job_results as late and
   charges nothing.

A plain job therefore costs two durable transactions on the worker (`begin` does not wait
for its WAL flush: losing it loses only a lease, see `commit_without_flush_wait`), plus one
read per step and a progress write at most every PROGRESS_WRITE_INTERVAL_S.

Transient database faults (docs/architecture.md, "Transient faults") never fail a job: a
progress write or lease check that cannot reach the database is skipped (the run goes on,
the next write carries the figures), `begin` and `finish` are retried (finish for up to
FINISH_RETRY_BUDGET_S), and each step recognises on a rerun that its commit already went
through. A fault that outlasts those budgets escapes `execute` as the database error; the
task then retries the delivery (workers.runtime).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.engine import Row

from billing.clock import utcnow
from billing.db import is_transient, run_transaction
from orchestrator.db import commit_without_flush_wait
from orchestrator.errors import OrchestratorError
from orchestrator.execution import leases
from orchestrator.execution.heartbeat import Heartbeat
from orchestrator.execution.leases import ATTEMPTS_MAX as ATTEMPTS_MAX  # re-exported
from orchestrator.jobs import states, webhooks
from orchestrator.jobs.records import lock_job, transition, webhook_event
from orchestrator.settings import get_settings
from orchestrator.settlement.settle import settle
from orchestrator.storage import Storage
from orchestrator.tables import job_results, jobs

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_S: Final = 0.25
# Transient faults: how long each step keeps retrying (seconds). Progress gives up fast and
# skips the database for PROGRESS_FAULT_PAUSE_S, so the render never waits on it; finish
# keeps trying for as long as a lease lasts, and begin in between.
PROGRESS_RETRY_BUDGET_S: Final = 0.5
PROGRESS_FAULT_PAUSE_S: Final = 2.0
BEGIN_RETRY_BUDGET_S: Final = 30.0
FINISH_RETRY_BUDGET_S: Final = 120.0
STEP_ATTEMPTS_MAX: Final = 400


Settle = Callable[[Connection, Row[Any], str, int, datetime, str | None], Any]


@dataclass(frozen=True)
class Phase:
    """One kind of work on a job: the status while it runs, the statuses a delivery may start
    it from, and how its result is paid for. Plain jobs have one phase; a tune has two
    (training, then rendering), each settled on its own hold."""

    running_status: str = states.RUNNING
    startable: frozenset[str] = frozenset({states.QUEUED, states.DISPATCHED, states.RUNNING})
    settle: Settle = settle
    # Success with no delivered output counts as failure (not for training: its product is
    # the LoRA, recorded by the runner).
    outputs_required: bool = True


JOB_PHASE: Final = Phase()


class JobStopped(OrchestratorError):
    """Raised inside a runner to stop it: the job was canceled or another attempt owns it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Attempt:
    job_id: str
    number: int
    token: str
    spec: dict[str, Any]
    account_id: str
    # The storage key of the spec's `image_id`, looked up when the job was taken (None when
    # the spec has no image or the image is not the account's).
    input_key: str | None = None
    # True when taking the job queued a `start` webhook in the outbox: `execute` then calls
    # its `on_started` (the worker relays at once instead of at the end).
    start_webhook: bool = False
    # For the worker's latency histograms: when the job was submitted, and how long it
    # queued before this attempt (None unless this is the job's first start).
    created_at: datetime | None = None
    queue_wait_s: float | None = None


@dataclass
class RunContext:
    """What a runner sees: the spec, input bytes, and calls for progress and outputs."""

    engine: Engine
    storage: Storage
    attempt: Attempt
    on_progress: Callable[[int, int], None] | None = None
    # The lease's heartbeat (execute starts it); once it is lost the run stops.
    heartbeat: Heartbeat | None = None
    delivered: int = 0
    # Outputs stored but not yet recorded on the job row (recorded by the next progress
    # write or by finish), and the last progress reported.
    unrecorded: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    total: int = 0
    # `begin` wrote progress 0 just now: the first write is due an interval later.
    _last_write: float = field(default_factory=time.monotonic)
    # After a transient database fault, progress leaves the database alone until then.
    _db_paused_until: float = 0.0
    db_faults: int = 0

    @property
    def spec(self) -> dict[str, Any]:
        return self.attempt.spec

    @property
    def job_id(self) -> str:
        return self.attempt.job_id

    def input_bytes(self) -> bytes:
        from orchestrator.jobs.images import UnknownImage

        if self.attempt.input_key is None:
            raise UnknownImage(f"image_id: no image {self.spec.get('image_id')!r}")
        return self.storage.get(self.attempt.input_key)

    def check_lease(self, conn: Connection, row: Row[Any] | None = None) -> None:
        """Raise JobStopped unless this attempt still owns a live, uncanceled job (`row`: the
        job as the caller just read it under its lock, saving a read)."""
        current: Any = row
        if current is None:
            current = conn.execute(
                select(jobs.c.status, jobs.c.lease_token, jobs.c.cancel_requested).where(
                    jobs.c.id == self.job_id
                )
            ).one()
        if current.lease_token != self.attempt.token or states.is_terminal(current.status):
            raise JobStopped("superseded")
        if current.cancel_requested:
            raise JobStopped("canceled")

    def progress(self, step: int, total: int) -> None:
        """Call once per step. Raises JobStopped when the run must stop. Progress (and the
        outputs delivered since the last write) is written at most once per interval; the
        final figures are written by `finish`."""
        self.step, self.total = step, total
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            raise JobStopped("superseded")
        now = time.monotonic()
        if now < self._db_paused_until:
            return  # the database was unreachable a moment ago: render on, write later
        write = now - self._last_write >= PROGRESS_WRITE_INTERVAL_S
        pending = list(self.unrecorded) if write else []

        def work(conn: Connection) -> None:
            if not write:
                self.check_lease(conn)
                return
            row = lock_job(conn, self.job_id)
            self.check_lease(conn, row)
            values: dict[str, Any] = {"progress_step": step, "progress_total": total}
            if pending:
                values["outputs"] = _merged(row.outputs, pending)
            conn.execute(update(jobs).where(jobs.c.id == self.job_id).values(**values))
            commit_without_flush_wait(conn)  # progress is redone if lost; nothing is charged

        try:
            run_transaction(self.engine, work, attempts_max=3, budget_s=PROGRESS_RETRY_BUDGET_S)
        except Exception as exc:
            if not is_transient(exc):
                raise
            # Not the job's failure: the outputs stay unrecorded for the next write or finish.
            self.db_faults += 1
            self._db_paused_until = time.monotonic() + PROGRESS_FAULT_PAUSE_S
            log.warning(
                "job %s: progress not written (database unreachable): %s",
                self.job_id,
                str(exc).splitlines()[0][:200],
            )
            return
        if write:
            self._last_write = now
            del self.unrecorded[: len(pending)]
            if self.on_progress is not None:
                self.on_progress(step, total)

    def deliver(self, index: int, png: bytes, meta: dict[str, Any] | None = None) -> None:
        """Store one output; it is recorded as delivered (and charged when the job settles)
        with the next progress write or by finish."""
        key = f"outputs/{self.job_id}/a{self.attempt.number}_{index}.png"
        self.storage.put(key, png)
        self.unrecorded.append(
            {
                "index": index,
                "key": key,
                "delivered": True,
                "meta": meta or {},
                **({"seed": meta["seed"]} if meta and "seed" in meta else {}),
            }
        )
        self.delivered += 1

    def not_delivered(self, index: int, reason: str) -> None:
        """An output that could not be delivered (not charged), with the reason."""
        self.unrecorded.append({"index": index, "delivered": False, "reason": reason})


def _merged(current: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job's outputs with `new` recorded (a later record for an index replaces one)."""
    by_index = {o["index"]: o for o in current}
    by_index.update((o["index"], o) for o in new)
    return list(by_index.values())


def begin(engine: Engine, job_id: str, worker: str, phase: Phase = JOB_PHASE) -> Attempt | None:
    """Take the job for this delivery, or return None when there is nothing to run."""
    token = secrets.token_hex(16)  # chosen once, so a rerun can recognise its own take

    def work(conn: Connection) -> Attempt | None:
        row = conn.execute(select(jobs).where(jobs.c.id == job_id).with_for_update()).first()
        if row is None:
            log.warning("task for unknown job %s ignored", job_id)
            return None
        if row.lease_token == token and row.status == phase.running_status:
            # A rerun after a commit whose answer was lost: this delivery already took it.
            input_key = _input_key(conn, row.account_id, row.spec)
            return Attempt(job_id, row.attempt, token, dict(row.spec), row.account_id, input_key)
        if row.status not in phase.startable:
            return None  # ended, or in another phase: a stale or duplicate delivery
        now = utcnow()
        taking_over = row.status == phase.running_status and row.lease_token is not None
        if taking_over and leases.is_live(row, now):
            if not leases.holder_gone(row, worker):
                return None  # another attempt holds a live lease: a duplicate delivery
            outcome = leases.WORKER_LOST
        else:
            outcome = leases.LEASE_EXPIRED
        if taking_over:
            leases.end_attempt(
                conn, job_id, row.status, row.attempt, outcome, now, f"taken over by {worker}"
            )
        if row.cancel_requested:
            delivered = sum(1 for o in row.outputs if o.get("delivered"))
            phase.settle(conn, row, states.CANCELED, delivered, now, "canceled by the client")
            return None
        if row.attempt >= ATTEMPTS_MAX:
            phase.settle(
                conn,
                row,
                states.FAILED,
                0,
                now,
                f"gave up after {row.attempt} attempts (worker lost each time)",
            )
            return None
        input_key = _input_key(conn, row.account_id, row.spec)
        started = transition(
            conn,
            job_id,
            phase.running_status,
            now,
            current=row.status,
            attempt=row.attempt + 1,
            lease_token=token,
            worker=worker[:200],
            worker_pid=os.getpid(),
            lease_expires_at=leases.lease_expiry(now),
            # When the job first began (a tune's training), not this attempt or phase.
            started_at=row.started_at or now,
            outputs=[],
            progress_step=0,
        )
        leases.start_attempt(conn, row, phase.running_status, row.attempt + 1, worker, now)
        # Only a lease is at stake: if a crash loses it, the job is redelivered or reaped.
        commit_without_flush_wait(conn)
        start_webhook = webhook_event(row.status, started.status) == "start" and webhooks.wants(
            started, "start"
        )
        waited = None if row.started_at else _seconds_between(row.created_at, now)
        return Attempt(
            job_id,
            row.attempt + 1,
            token,
            dict(row.spec),
            row.account_id,
            input_key,
            start_webhook=start_webhook,
            created_at=row.created_at,
            queue_wait_s=waited,
        )

    return run_transaction(
        engine, work, attempts_max=STEP_ATTEMPTS_MAX, budget_s=BEGIN_RETRY_BUDGET_S
    )


def _input_key(conn: Connection, account_id: str, spec: dict[str, Any]) -> str | None:
    from orchestrator.jobs.images import image_key

    image_id = spec.get("image_id")
    if not isinstance(image_id, str):
        return None
    try:
        return image_key(conn, account_id, image_id)
    except OrchestratorError:
        return None


def finish(
    engine: Engine,
    attempt: Attempt,
    outcome: str,
    error: str | None = None,
    phase: Phase = JOB_PHASE,
    ctx: RunContext | None = None,
    budget_s: float = FINISH_RETRY_BUDGET_S,
) -> str:
    """Apply an attempt's result once: record the outputs and final progress `ctx` has not
    written yet, then settle. Returns the job's status afterwards. Retried through transient
    faults for up to `budget_s`; a rerun after a lost commit answer finds this attempt's
    result already recorded and returns the status it left."""
    assert outcome in (states.SUCCEEDED, states.FAILED, states.CANCELED), outcome

    def work(conn: Connection) -> str:
        row = lock_job(conn, attempt.job_id)
        if _result_recorded(conn, attempt, phase):
            return str(row.status)
        now = utcnow()
        current = row.lease_token == attempt.token and row.status == phase.running_status
        if current and ctx is not None:
            values: dict[str, Any] = {}
            if ctx.unrecorded:
                values["outputs"] = _merged(row.outputs, ctx.unrecorded)
            if ctx.total:
                values["progress_step"], values["progress_total"] = ctx.step, ctx.total
            if values:
                row = conn.execute(
                    update(jobs).where(jobs.c.id == row.id).values(**values).returning(*jobs.c)
                ).one()
        delivered = [o for o in row.outputs if o.get("delivered")]
        if current:
            ended = outcome
        else:
            ended = leases.LATE if states.is_terminal(row.status) else leases.SUPERSEDED
        leases.end_attempt(conn, row.id, phase.running_status, attempt.number, ended, now, error)
        conn.execute(
            insert(job_results).values(
                job_id=row.id,
                phase=phase.running_status,
                attempt=attempt.number,
                outcome=outcome,
                delivered=len(delivered) if current else 0,
                applied=current,
                detail=error if current else f"late: job {row.status}, attempt {row.attempt}",
                created_at=now,
            )
        )
        if not current:
            return str(row.status)
        status, reason = outcome, error
        if status == states.SUCCEEDED and not delivered and phase.outputs_required:
            status, reason = states.FAILED, reason or _undelivered_reason(row.outputs)
        missing = row.outputs_expected - len(delivered)
        if status == states.SUCCEEDED and missing > 0 and reason is None and phase.outputs_required:
            reason = (
                f"{missing} of {row.outputs_expected} outputs not delivered: "
                f"{_undelivered_reason(row.outputs)}"
            )
        # A failed job is refunded in full; a canceled or partial one pays for what it got.
        charged_outputs = 0 if status == states.FAILED else len(delivered)
        return str(phase.settle(conn, row, status, charged_outputs, now, reason).status)

    return run_transaction(engine, work, attempts_max=STEP_ATTEMPTS_MAX, budget_s=budget_s)


def _result_recorded(conn: Connection, attempt: Attempt, phase: Phase) -> bool:
    found = conn.execute(
        select(job_results.c.id).where(
            job_results.c.job_id == attempt.job_id,
            job_results.c.phase == phase.running_status,
            job_results.c.attempt == attempt.number,
        )
    ).first()
    return found is not None


def _undelivered_reason(outputs: list[dict[str, Any]]) -> str:
    reasons = sorted({o.get("reason") or "unknown" for o in outputs if not o.get("delivered")})
    return "; ".join(reasons) if reasons else "no outputs were produced"


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
) -> dict[str, Any]:
    """The whole worker side of a job. Safe to call twice for the same job."""
    attempt = begin(engine, job_id, worker, phase)
    if attempt is None:
        return {"job_id": job_id, "status": "skipped"}
    if attempt.start_webhook and on_started is not None:
        on_started()
    heartbeat = Heartbeat(
        engine, job_id, attempt.token, get_settings().lease_renew_interval_s
    ).start()
    try:
        return _run(engine, storage, attempt, runner, on_progress, phase, heartbeat)
    finally:
        heartbeat.stop()  # after finish: the lease is held until the result is applied


def _run(
    engine: Engine,
    storage: Storage,
    attempt: Attempt,
    runner: Runner,
    on_progress: Callable[[int, int], None] | None,
    phase: Phase,
    heartbeat: Heartbeat,
) -> dict[str, Any]:
    job_id = attempt.job_id
    ctx = RunContext(engine, storage, attempt, on_progress, heartbeat)

    def finish_(outcome: str, error: str | None) -> str:
        # Through an outage, keep trying for as long as the lease is surely held, and at
        # least FINISH_RETRY_BUDGET_S: a result applied after the sweep took the job back is
        # recorded as late and charges nothing, so trying longer is never wrong.
        budget_s = max(FINISH_RETRY_BUDGET_S, heartbeat.held_until - time.monotonic())
        return finish(engine, attempt, outcome, error, phase, ctx, budget_s=budget_s)

    try:
        runner(ctx)
    except JobStopped as stop:
        if stop.reason == "superseded":
            status = finish_(states.FAILED, "superseded by a newer attempt")
        else:
            status = finish_(states.CANCELED, "canceled by the client")
        return _result(attempt, status)
    except Exception as exc:
        if is_transient(exc):
            # The runner's own database call hit an outage: not the job's failure. The job
            # stays running; once this lease lapses, the lease sweep dispatches it again.
            log.warning("job %s: database unreachable inside the runner: %s", job_id, exc)
            raise
        log.exception("job %s failed", job_id)
        status = finish_(states.FAILED, _reason(exc))
        return _result(attempt, status)
    status = finish_(states.SUCCEEDED, None)
    return _result(attempt, status)


def _result(attempt: Attempt, status: str) -> dict[str, Any]:
    """The task's return value; the timings feed workers.metrics' latency histograms."""
    result: dict[str, Any] = {"job_id": attempt.job_id, "status": status}
    result["job_type"] = attempt.spec.get("type")
    result["queue_wait_s"] = attempt.queue_wait_s
    if states.is_terminal(status) and attempt.created_at is not None:
        result["latency_s"] = _seconds_between(attempt.created_at, utcnow())
    return result


def _seconds_between(then: datetime, now: datetime) -> float:
    if then.tzinfo is None:  # SQLite hands back naive UTC
        then = then.replace(tzinfo=UTC)
    return max(0.0, (now - then).total_seconds())


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:500]
