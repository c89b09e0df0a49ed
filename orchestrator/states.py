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

STATUSES: Final = (QUEUED, DISPATCHED, RUNNING, SUCCEEDED, FAILED, CANCELED, EXPIRED, REJECTED)
TERMINAL: Final = frozenset({SUCCEEDED, FAILED, CANCELED, EXPIRED, REJECTED})
ACTIVE: Final = frozenset({QUEUED, DISPATCHED, RUNNING})

_ENDINGS = {SUCCEEDED, FAILED, CANCELED, EXPIRED}
TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    QUEUED: frozenset({DISPATCHED, RUNNING} | _ENDINGS),
    # A task can reach a worker before the dispatcher has recorded `dispatched`.
    DISPATCHED: frozenset({RUNNING} | _ENDINGS),
    # RUNNING -> RUNNING: a redelivered task takes the job over with a new attempt.
    RUNNING: frozenset({RUNNING} | _ENDINGS),
    **{s: frozenset() for s in TERMINAL},
}


def can_transition(current: str, new: str) -> bool:
    return new in TRANSITIONS.get(current, frozenset())


def is_terminal(status: str) -> bool:
    return status in TERMINAL
