"""Celery configuration for Tollgate (no model imports: the API and intake use it to send)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery
from celery.signals import beat_init
from kombu import Queue

from orchestrator.jobs.families import (
    CALLBACK_QUEUE,
    CALLBACK_TASK,
    FAMILIES,
    GPU_QUEUES,
    MAINTENANCE_QUEUE,
    VISIBILITY_TIMEOUT_S,
)
from orchestrator.settings import get_settings

TASK_MODULES = (
    "workers.txt2img",
    "workers.upscale",
    "workers.face_enhance",
    "workers.remove_background",
    "workers.tune",
    "workers.callbacks",
    "workers.maintenance",
)
# Housekeeping runs every few seconds; its events would bury the product's tasks in Flower.
# So these tasks send no task events (`send_events=False` on each, wherever a worker runs
# them) and beat, which sends only these, sends no task-sent events. Product tasks (jobs,
# callbacks, and the dispatches the re-publisher relays) keep all their events.
HOUSEKEEPING_TASKS = (
    "tollgate.reap",
    "tollgate.republish",
    "tollgate.tunes",
    "tollgate.leases",
    "tollgate.outputs",
    "tollgate.dispatch",
)
REAP_INTERVAL_S = 15
REPUBLISH_INTERVAL_S = 5
TUNES_INTERVAL_S = 60
OUTPUTS_INTERVAL_S = 300


def make_celery(redis_url: str, *, include: tuple[str, ...] = TASK_MODULES) -> Celery:
    if not redis_url:
        raise RuntimeError("TOLLGATE_REDIS_URL is not set (tollgate standalone sets it for you)")
    app = Celery("tollgate", broker=redis_url, backend=redis_url, include=list(include))
    routes: dict[str, Any] = {f.task_name: {"queue": f.queue} for f in FAMILIES.values()}
    routes[CALLBACK_TASK] = {"queue": CALLBACK_QUEUE}
    routes["tollgate.reap"] = {"queue": MAINTENANCE_QUEUE}
    routes["tollgate.republish"] = {"queue": MAINTENANCE_QUEUE}
    routes["tollgate.leases"] = {"queue": MAINTENANCE_QUEUE}
    routes["tollgate.tunes"] = {"queue": MAINTENANCE_QUEUE}
    routes["tollgate.outputs"] = {"queue": MAINTENANCE_QUEUE}
    routes["tollgate.dispatch"] = {"queue": MAINTENANCE_QUEUE}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        # A job's state lives in PostgreSQL (and on tollgate:events), so the result backend
        # keeps only failures: no STARTED/SUCCESS writes per task. A task that is waited on
        # through Celery (none in the product) sets ignore_result=False.
        task_ignore_result=True,
        task_store_errors_even_if_ignored=True,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=timedelta(days=1),
        task_queues=[Queue(q) for q in (*GPU_QUEUES, CALLBACK_QUEUE, MAINTENANCE_QUEUE)],
        task_default_queue=MAINTENANCE_QUEUE,
        task_routes=routes,
        # Each periodic run expires when the next is due: a busy worker (the demo runs every
        # queue on one) then drops stale runs instead of working through a backlog of them.
        beat_schedule={
            name: {"task": task, "schedule": every_s, "options": {"expires": every_s}}
            for name, task, every_s in (
                ("reap", "tollgate.reap", REAP_INTERVAL_S),
                ("republish", "tollgate.republish", REPUBLISH_INTERVAL_S),
                ("leases", "tollgate.leases", get_settings().lease_sweep_interval_s),
                ("tunes", "tollgate.tunes", TUNES_INTERVAL_S),
                ("outputs", "tollgate.outputs", OUTPUTS_INTERVAL_S),
                ("dispatch", "tollgate.dispatch", get_settings().dispatch_interval_s),
            )
        },
        worker_hijack_root_logger=False,
    )
    return app


@beat_init.connect(weak=False)
def _beat_sends_no_task_events(sender: Any = None, **_: Any) -> None:
    """Beat only sends housekeeping: keep its task-sent events out of Flower."""
    app = getattr(sender, "app", None)
    if app is not None:
        app.conf.task_send_sent_event = False
