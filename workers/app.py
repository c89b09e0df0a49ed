"""The Celery app: `celery -A workers.app worker -Q gpu.txt2img,gpu.post ...`."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from celery.signals import worker_init, worker_process_init

from orchestrator import faults
from orchestrator.settings import get_settings
from workers.celery_config import make_celery

app = make_celery(get_settings().redis_url)
faults.set_process("worker")

# The PostgreSQL driver is imported once here, before the pool forks, instead of by each
# pool child's first job (about 0.15 s of CPU per child, inside that job).
with contextlib.suppress(ImportError):
    import psycopg  # noqa: F401


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """Pools and CUDA are per process: drop whatever the parent created before the fork."""
    from orchestrator.db import engine_for, get_engine

    engine_for.cache_clear()
    # This child's engine now (no connection yet), not inside its first job.
    with contextlib.suppress(Exception):  # a bad URL fails the first job, as before
        get_engine()


@worker_init.connect
def _check_secrets(**_: Any) -> None:
    """Refuse to start with the default callback secret, naming the variable. (SystemExit,
    because Celery logs and swallows an Exception from a signal handler.)"""
    from orchestrator.settings import UnsafeSettings, check_startup

    try:
        check_startup("worker")
    except UnsafeSettings as exc:
        raise SystemExit(f"error: {exc}") from None


@worker_init.connect
def _check_models(**_: Any) -> None:
    """Fail at start, naming the file, when a model this worker serves is missing.
    TOLLGATE_WORKER_MODELS lists them (comma-separated; default: every registry entry)."""
    if not os.environ.get("TOLLGATE_MODELS"):
        return
    from models.registry import load_registry

    served = [m for m in os.environ.get("TOLLGATE_WORKER_MODELS", "").split(",") if m]
    load_registry(check_files=False).check_files(served or None)


import workers.metrics  # noqa: E402,F401  (Prometheus metrics of this worker)
import workers.slots  # noqa: E402,F401  (announces this worker's slots to the scheduler)
