"""What a runner sees while it works (`RunContext`): the spec, its input bytes, and calls for
progress (which check the lease and the cancel flag) and for outputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.engine import Row

from billing.db import is_transient, run_transaction
from orchestrator.db import commit_without_flush_wait
from orchestrator.execution.attempt import (
    PROGRESS_CHECK_INTERVAL_S,
    PROGRESS_FAULT_PAUSE_S,
    PROGRESS_RETRY_BUDGET_S,
    PROGRESS_WRITE_INTERVAL_S,
    Attempt,
    JobStopped,
)
from orchestrator.execution.heartbeat import Heartbeat
from orchestrator.jobs import states
from orchestrator.jobs.records import lock_job
from orchestrator.storage import Storage
from orchestrator.tables import jobs

log = logging.getLogger(__name__)

_LEASE_CHECK = select(jobs.c.status, jobs.c.lease_token, jobs.c.cancel_requested)


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
    # Whether a progress write of this attempt recorded outputs on the row (finish's
    # one-call path needs the row's outputs to be only what `unrecorded` holds).
    recorded_any: bool = False
    step: int = 0
    total: int = 0
    # Outputs written without their disk flush (`deliver`); `flush_outputs` makes them
    # durable before anything records or charges them.
    unflushed: list[str] = field(default_factory=list)
    # `begin` wrote progress 0 just now: the first write is due an interval later.
    _last_write: float = field(default_factory=time.monotonic)
    # ... and checked the lease and the cancel flag: the next check is due an interval later.
    _last_check: float = field(default_factory=time.monotonic)
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
            current = conn.execute(_LEASE_CHECK.where(jobs.c.id == self.job_id)).one()
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
        if not write and now - self._last_check < PROGRESS_CHECK_INTERVAL_S:
            return  # checked a moment ago
        pending = list(self.unrecorded) if write else []
        if pending:
            self.flush_outputs()  # an output on the job's row is on disk

        def work(conn: Connection) -> None:
            if not write:
                self.check_lease(conn)
                return
            row = lock_job(conn, self.job_id)
            self.check_lease(conn, row)
            values: dict[str, Any] = {"progress_step": step, "progress_total": total}
            if pending:
                self.recorded_any = True  # before the commit: an ambiguous one counts too
                values["outputs"] = merged(row.outputs, pending)
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
        self._last_check = now
        if write:
            self._last_write = now
            del self.unrecorded[: len(pending)]
            if self.on_progress is not None:
                self.on_progress(step, total)

    def deliver(self, index: int, png: bytes, meta: dict[str, Any] | None = None) -> None:
        """Store one output; it is recorded as delivered (and charged when the job settles)
        with the next progress write or by finish."""
        key = f"outputs/{self.job_id}/a{self.attempt.number}_{index}.png"
        # Written now, flushed to disk with the run's other outputs before they are recorded
        # or charged (flush_outputs): the runner does not wait for each file's fsync.
        self.storage.put(key, png, flush=False)
        self.unflushed.append(key)
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

    def flush_outputs(self) -> None:
        """Make the outputs delivered so far durable (one fsync per file, one per folder)."""
        if self.unflushed:
            self.storage.flush(self.unflushed)
            self.unflushed.clear()

    def withdraw_unflushed(self, reason: str) -> None:
        """Outputs whose flush failed: recorded as not delivered (never charged)."""
        gone = set(self.unflushed)
        self.unrecorded[:] = [
            {"index": o["index"], "delivered": False, "reason": reason}
            if o.get("key") in gone
            else o
            for o in self.unrecorded
        ]
        self.delivered -= len(gone)
        self.unflushed.clear()

    def not_delivered(self, index: int, reason: str) -> None:
        """An output that could not be delivered (not charged), with the reason."""
        self.unrecorded.append({"index": index, "delivered": False, "reason": reason})


def merged(current: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job's outputs with `new` recorded (a later record for an index replaces one)."""
    by_index = {o["index"]: o for o in current}
    by_index.update((o["index"], o) for o in new)
    return list(by_index.values())
