"""The worker announces its slots (hostname, queues, concurrency) to the scheduler: at
`worker_ready`, then every third of `worker_slots_ttl_s` from a daemon thread of the main
process, withdrawn at shutdown (orchestrator.scheduling.slots). Capacity is never set by hand:
a worker that dies stops refreshing and its slots expire."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from orchestrator.scheduling.slots import WorkerSlots, announce, withdraw
from orchestrator.settings import get_settings

log = logging.getLogger(__name__)

_state: dict[str, Any] = {}


def _slots_of(consumer: Any) -> WorkerSlots:
    queues = sorted(consumer.app.amqp.queues.consume_from)
    controller = consumer.controller
    concurrency = int(getattr(controller, "concurrency", None) or 1)
    return WorkerSlots(str(consumer.hostname), tuple(queues), concurrency)


def _refresh(worker: WorkerSlots, stop: threading.Event, ttl_s: float) -> None:
    from orchestrator.scheduling.dispatch import redis_for

    while not stop.wait(ttl_s / 3):
        try:
            announce(redis_for(get_settings().redis_url), worker, ttl_s)
        except Exception:  # Redis away: retried at the next tick; the TTL covers a gap
            log.warning("slot announcement failed", exc_info=True)


@worker_ready.connect
def _announce(sender: Any = None, **_: Any) -> None:
    from orchestrator.scheduling.dispatch import redis_for

    worker = _slots_of(sender)
    ttl_s = get_settings().worker_slots_ttl_s
    announce(redis_for(get_settings().redis_url), worker, ttl_s)
    stop = threading.Event()
    thread = threading.Thread(
        target=_refresh, args=(worker, stop, ttl_s), name="tollgate-slots", daemon=True
    )
    thread.start()
    _state.update(worker=worker, stop=stop)
    log.info("announced %d slots on %s", worker.concurrency, ",".join(worker.queues))


@worker_shutdown.connect
def _withdraw(**_: Any) -> None:
    worker, stop = _state.get("worker"), _state.get("stop")
    if stop is not None:
        stop.set()
    if worker is not None:
        from orchestrator.scheduling.dispatch import redis_for

        with contextlib.suppress(Exception):
            withdraw(redis_for(get_settings().redis_url), worker)
