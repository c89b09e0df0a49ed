"""What a job family adds to the job service, registered by the family itself.

The job service knows plain image jobs. A family with more to do at submit or settlement
(tunes: photos, the tune row, two phases each settled on its own hold) registers a `Kind`
for its job types when its module is imported, so `jobs` never imports a family. A type
that needs a family which nobody registered is refused, never run as a plain job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection
from sqlalchemy.engine import Row

from orchestrator.errors import OrchestratorError
from orchestrator.storage import Storage

# Job types whose family must be registered before they are submitted or settled.
FAMILY_TYPES: Final = frozenset({"tune", "tune_prompt"})


class UnregisteredFamily(OrchestratorError):
    pass


@dataclass(frozen=True)
class Kind:
    # Before the job row is written: check and complete the spec (inside submit's transaction).
    before_insert: Callable[[Connection, str, dict[str, Any]], None] | None = None
    # After the hold is placed: the family's own rows (inside submit's transaction).
    after_hold: Callable[[Connection, Storage, str, str, dict[str, Any], datetime], None] | None = (
        None
    )
    # How a job of this kind is settled in its current phase (None: the plain settle).
    settler_for: Callable[[Row[Any]], Any] | None = None
    # Plain image jobs resolve `image_id` / `image_b64` at submit.
    takes_input_image: bool = True


PLAIN: Final = Kind()
_KINDS: dict[str, Kind] = {}


def register(job_type: str, kind: Kind) -> None:
    _KINDS[job_type] = kind


def kind_for(job_type: str) -> Kind:
    kind = _KINDS.get(job_type)
    if kind is not None:
        return kind
    if job_type in FAMILY_TYPES:
        raise UnregisteredFamily(
            f"job type {job_type!r} needs its family registered (import orchestrator.tunes.service)"
        )
    return PLAIN
