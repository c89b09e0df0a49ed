"""The product worker for tune tests, plus one test-only behaviour: a safety check that
withholds as many images as the Redis key `tollgate:test:withhold` says (then none)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

import workers.tune
import workers.txt2img  # noqa: F401  (the product tasks)
from models.manager import default_manager
from orchestrator.settings import get_settings
from workers.app import app

WITHHOLD_KEY = "tollgate:test:withhold"


def withhold_some(images: Sequence[Any]) -> list[str | None]:
    client = redis.Redis.from_url(get_settings().redis_url)
    out: list[str | None] = []
    for _ in images:
        left = client.decr(WITHHOLD_KEY)
        out.append("withheld by the test safety check" if left >= 0 else None)
    if left < 0:
        client.delete(WITHHOLD_KEY)
    return out


default_manager().safety_check = withhold_some

__all__ = ["app"]
