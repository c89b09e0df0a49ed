"""The soak's input: job messages onto `tollgate:jobs`, with duplicates and malformed ones."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import redis

from bench.soak.faults import Chaos
from orchestrator.ingress.streams import JOBS_STREAM

SEND_ATTEMPTS_MAX = 60
SEND_RETRY_S = 0.5


def spec(rng: random.Random) -> dict[str, Any]:
    return {
        "type": "txt2img",
        "prompt": f"chaos {rng.randrange(10**6)}",
        "width": 256,
        "height": 256,
        "steps": rng.choice((2, 3, 4)),
        "num_images": rng.choice((1, 1, 2)),
    }


def feed(
    redis_port: int,
    db: int,
    owners: list[str],
    poor: str,
    n: int,
    rate: float,
    rng: random.Random,
    chaos: Chaos,
) -> dict[str, int]:
    """XADD n messages at `rate`/s: valid jobs, a few duplicates (the same message twice) and
    malformed ones. Redis restarts are ridden out (bounded retries per message)."""
    client = redis.Redis(host="127.0.0.1", port=redis_port, db=db, socket_timeout=5)
    sent = {"valid": 0, "duplicate": 0, "malformed": 0, "lost": 0}
    previous: str | None = None
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        roll = rng.random()
        if roll < 0.04:
            text, kind = rng.choice(('{"account_id": ', '{"spec": {}}', "[]")), "malformed"
        elif roll < 0.08 and previous is not None:
            text, kind = previous, "duplicate"
        else:
            account = poor if rng.random() < 0.15 else rng.choice(owners)
            text = json.dumps(
                {"account_id": account, "idempotency_key": f"chaos-{i}", "spec": spec(rng)}
            )
            kind, previous = "valid", text
        for _attempt in range(SEND_ATTEMPTS_MAX):
            try:
                client.xadd(JOBS_STREAM, {"job": text})
                sent[kind] += 1
                break
            except redis.RedisError:
                time.sleep(SEND_RETRY_S)
        else:
            sent["lost"] += 1
            chaos.note(f"message {i} could not be sent")
    return sent
