"""The `tollgate:events` stream: one entry per job state change (and throttled progress)."""

from __future__ import annotations

from typing import Any, Final

import redis

EVENTS_STREAM: Final = "tollgate:events"
# Bounded: readers that fall further behind than this lose the oldest entries.
EVENTS_MAXLEN: Final = 100_000


def append_event(client: redis.Redis | redis.client.Pipeline, payload: dict[str, Any]) -> None:
    fields = {k: "" if v is None else str(v) for k, v in payload.items()}
    client.xadd(EVENTS_STREAM, fields, maxlen=EVENTS_MAXLEN, approximate=True)  # type: ignore[arg-type]
