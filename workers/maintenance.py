"""Beat tasks: the reaper, the outbox re-publisher, the periodic dispatcher and tunes."""

from __future__ import annotations

from orchestrator.db import get_engine
from orchestrator.scheduling.dispatch import get_publisher
from orchestrator.scheduling.outbox import relay
from orchestrator.scheduling.scheduler import nudge
from orchestrator.settlement.reaper import reap
from orchestrator.settlement.retention import sweep_expired
from orchestrator.storage import get_storage
from orchestrator.tunes.service import start_waiting_renders
from workers.app import app

# Messages younger than this are left to the fast path of the process that wrote them.
REPUBLISH_MIN_AGE_S = 2.0


@app.task(name="tollgate.reap")
def reap_task() -> int:
    return len(reap(get_engine()))


@app.task(name="tollgate.republish")
def republish_task() -> int:
    return relay(get_engine(), get_publisher(), min_age_s=REPUBLISH_MIN_AGE_S)


@app.task(name="tollgate.tunes")
def tunes_task() -> dict[str, int]:
    """Retention sweep, and renders for tunes whose credits arrived by any path."""
    engine = get_engine()
    swept = sweep_expired(engine, get_storage())
    started = start_waiting_renders(engine)
    nudge(engine, get_publisher())
    relay(engine, get_publisher())
    return {"expired": len(swept), "renders_started": len(started)}


@app.task(name="tollgate.dispatch")
def dispatch_task() -> int:
    """The periodic dispatcher: whatever a missed nudge left queued goes out within one
    interval (the fast paths run it after each submit and each job's end)."""
    return len(nudge(get_engine(), get_publisher()))
