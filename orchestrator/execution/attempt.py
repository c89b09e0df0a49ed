"""What a worker's run of a job is made of: the phase it runs (`Phase`), the attempt that
holds the job's lease (`Attempt`), the signal that stops a runner (`JobStopped`), and the
retry budgets of each step (orchestrator.execution.protocol describes the protocol)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection
from sqlalchemy.engine import Row

from orchestrator.errors import OrchestratorError
from orchestrator.jobs import states
from orchestrator.settlement.settle import settle

PROGRESS_WRITE_INTERVAL_S: Final = 0.25
# Between writes, progress reads the lease and the cancel flag at most this often (begin
# has just checked both): a cancel stops the run within this + one step, and a job of many
# short steps costs a read per interval, not per step.
PROGRESS_CHECK_INTERVAL_S: Final = 0.1
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
class Price:
    """What `finish` needs to settle a plain job in one call (orchestrator.execution.result):
    the job's price, its price per delivered output and how many outputs it expects."""

    credits: int
    per_output: int
    outputs_expected: int


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
    price: Price | None = None
