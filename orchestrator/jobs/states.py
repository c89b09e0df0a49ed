"""Job states and the transitions between them (pure)."""

from __future__ import annotations

from typing import Final

QUEUED: Final = "queued"
DISPATCHED: Final = "dispatched"
RUNNING: Final = "running"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
CANCELED: Final = "canceled"
EXPIRED: Final = "expired"
REJECTED: Final = "rejected"
# Tunes only: training replaces running; a trained tune renders its 64 images or waits for
# the tune_image credits to do so.
TRAINING: Final = "training"
AWAITING_CREDITS: Final = "awaiting_credits"
RENDERING: Final = "rendering"

STATUSES: Final = (
    QUEUED,
    DISPATCHED,
    RUNNING,
    TRAINING,
    AWAITING_CREDITS,
    RENDERING,
    SUCCEEDED,
    FAILED,
    CANCELED,
    EXPIRED,
    REJECTED,
)
TERMINAL: Final = frozenset({SUCCEEDED, FAILED, CANCELED, EXPIRED, REJECTED})
# States a deadline applies to (the reaper expires them). awaiting_credits has no deadline:
# a trained tune may wait for credits until its retention period ends.
ACTIVE: Final = frozenset({QUEUED, DISPATCHED, RUNNING, TRAINING, RENDERING})

_ENDINGS = {SUCCEEDED, FAILED, CANCELED, EXPIRED}
TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    QUEUED: frozenset({DISPATCHED, RUNNING, TRAINING} | _ENDINGS),
    # A task can reach a worker before the dispatcher has recorded `dispatched`.
    DISPATCHED: frozenset({RUNNING, TRAINING} | _ENDINGS),
    # X -> X: a redelivered task takes the job over with a new attempt. -> queued: the lease
    # sweep dispatches a job whose worker was lost again (settlement.lease_sweep.requeue).
    RUNNING: frozenset({RUNNING, QUEUED} | _ENDINGS),
    TRAINING: frozenset({TRAINING, QUEUED, AWAITING_CREDITS, RENDERING} | _ENDINGS - {SUCCEEDED}),
    AWAITING_CREDITS: frozenset({RENDERING, CANCELED, EXPIRED}),
    RENDERING: frozenset({RENDERING} | _ENDINGS),
    # A succeeded tune expires when the retention sweeper deletes its weights.
    SUCCEEDED: frozenset({EXPIRED}),
    **{s: frozenset() for s in TERMINAL - {SUCCEEDED}},
}


def can_transition(current: str, new: str) -> bool:
    return new in TRANSITIONS.get(current, frozenset())


def is_terminal(status: str) -> bool:
    return status in TERMINAL
