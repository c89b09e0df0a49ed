"""Beat tasks: the reaper, the lease sweep, the outbox re-publisher, the periodic dispatcher,
tunes and output retention.

Each runs its work inside `_tolerant`: the database calls already retry transient faults
(run_transaction), and one that outlasts its budget ends this run with a warning instead of
a task failure; the next run (every few seconds) starts over. Nothing is lost: the reaper,
the sweep and the re-publisher work from the database's state.
They send no task events (workers.celery_config.HOUSEKEEPING_TASKS): Flower lists product
tasks only."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from orchestrator.db import get_engine
from orchestrator.faults import dependency_of, process_scope
from orchestrator.payments.purchases import lapse_due
from orchestrator.scheduling.dispatch import get_publisher
from orchestrator.scheduling.outbox import prune, relay, relay_quietly
from orchestrator.scheduling.scheduler import nudge, resend_stale
from orchestrator.settlement.lease_sweep import sweep
from orchestrator.settlement.output_retention import sweep_outputs
from orchestrator.settlement.reaper import reap
from orchestrator.settlement.retention import sweep_expired
from orchestrator.storage import get_storage
from orchestrator.tunes.service import start_waiting_renders
from workers.app import app
from workers.metrics import count_recoveries

log = logging.getLogger(__name__)

T = TypeVar("T")

# Messages younger than this are left to the fast path of the process that wrote them.
REPUBLISH_MIN_AGE_S = 2.0


def _tolerant(name: str, work: Callable[[], T], skipped: T) -> T:
    with process_scope("beat"):
        try:
            return work()
        except Exception as exc:
            dependency = dependency_of(exc)
            if dependency is None:
                raise
            log.warning("%s: %s unreachable, this run skipped: %s", name, dependency, exc)
            return skipped


@app.task(name="tollgate.reap", send_events=False)
def reap_task() -> int:
    return _tolerant("reap", lambda: len(reap(get_engine())), 0)


@app.task(name="tollgate.leases", send_events=False)
def leases_task() -> dict[str, int]:
    """Take back jobs whose lease expired (cancel, dispatch again, or fail and refund)."""

    def work() -> dict[str, int]:
        engine = get_engine()
        recovered = sweep(engine)
        count_recoveries(recovered)
        if recovered:
            relay_quietly(engine, get_publisher(), [r.job_id for r in recovered])
        return {
            action: sum(1 for r in recovered if r.action == action)
            for action in ("redispatched", "canceled", "failed")
        }

    return _tolerant("leases", work, {"redispatched": 0, "canceled": 0, "failed": 0})


@app.task(name="tollgate.republish", send_events=False)
def republish_task() -> int:
    """Unpublished outbox rows older than REPUBLISH_MIN_AGE_S, then the tasks of jobs
    dispatched long ago that no worker began (scheduler.resend_stale); then the rows sent
    over an hour ago are deleted (outbox.prune, bounded per run)."""

    def work() -> int:
        engine, publisher = get_engine(), get_publisher()
        sent = relay(engine, publisher, min_age_s=REPUBLISH_MIN_AGE_S) + len(
            resend_stale(engine, publisher)
        )
        prune(engine)
        return sent

    return _tolerant("republish", work, 0)


@app.task(name="tollgate.tunes", send_events=False)
def tunes_task() -> dict[str, int]:
    """Scheduled plan lapses, the retention sweep, and renders for tunes whose credits
    arrived by any path."""

    def work() -> dict[str, int]:
        engine = get_engine()
        lapsed = lapse_due(engine)
        swept = sweep_expired(engine, get_storage())
        started = start_waiting_renders(engine)
        nudge(engine, get_publisher())
        relay(engine, get_publisher())
        return {"lapsed": len(lapsed), "expired": len(swept), "renders_started": len(started)}

    return _tolerant("tunes", work, {"lapsed": 0, "expired": 0, "renders_started": 0})


@app.task(name="tollgate.outputs", send_events=False)
def outputs_task() -> dict[str, int]:
    """Output retention: one bounded batch of expired outputs and input images."""
    return _tolerant("outputs", _outputs_batch, {"jobs": 0, "images": 0})


def _outputs_batch() -> dict[str, int]:
    swept = sweep_outputs(get_engine(), get_storage())
    return {"jobs": len(swept.jobs), "images": len(swept.images)}


@app.task(name="tollgate.dispatch", send_events=False)
def dispatch_task() -> int:
    """The periodic dispatcher: whatever a missed nudge left queued goes out within one
    interval (the fast paths run it after each submit and each job's end)."""
    return _tolerant("dispatch", lambda: len(nudge(get_engine(), get_publisher())), 0)
