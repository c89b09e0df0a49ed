"""The Celery app: `celery -A workers.app worker -Q gpu.txt2img,gpu.post ...`."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init

from orchestrator.settings import get_settings
from workers.celery_config import make_celery

app = make_celery(get_settings().redis_url)


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """Pools and CUDA are per process: drop whatever the parent created before the fork."""
    from orchestrator.db import engine_for

    engine_for.cache_clear()
