"""Beat tasks: the reaper, the outbox re-publisher and the tune sweep. They send no task
events (workers.celery_config.HOUSEKEEPING_TASKS): Flower lists product tasks only."""

from __future__ import annotations

from orchestrator.db import get_engine
from orchestrator.dispatch import get_publisher
from orchestrator.outbox import relay
from orchestrator.reaper import reap
from orchestrator.retention import sweep_expired
from orchestrator.storage import get_storage
from orchestrator.tunes import start_waiting_renders
from workers.app import app

# Messages younger than this are left to the fast path of the process that wrote them.
REPUBLISH_MIN_AGE_S = 2.0


@app.task(name="tollgate.reap", send_events=False)
def reap_task() -> int:
    return len(reap(get_engine()))


@app.task(name="tollgate.republish", send_events=False)
def republish_task() -> int:
    return relay(get_engine(), get_publisher(), min_age_s=REPUBLISH_MIN_AGE_S)


@app.task(name="tollgate.tunes", send_events=False)
def tunes_task() -> dict[str, int]:
    """Retention sweep, and renders for tunes whose credits arrived by any path."""
    engine = get_engine()
    swept = sweep_expired(engine, get_storage())
    started = start_waiting_renders(engine)
    relay(engine, get_publisher())
    return {"expired": len(swept), "renders_started": len(started)}
