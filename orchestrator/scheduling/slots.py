"""Worker slots and run-time estimates, in Redis.

Each Celery worker's main process announces `hostname, queues, concurrency` as a member of
the sorted set `tollgate:slots`, scored by its expiry (now + `worker_slots_ttl_s`), and
refreshes it every third of that; it withdraws the member at shutdown. A worker that dies
stops refreshing and drops out within the TTL. Nobody configures capacity by hand.

Run times: an exponentially weighted mean of the seconds a task occupied a slot, per family
(`tollgate:sched:run_s`), for queue ETAs. Queue waits per plan: histogram buckets
(`tollgate:sched:wait:<plan>`), read by /metrics.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

SLOTS_KEY: Final = "tollgate:slots"
RUN_S_KEY: Final = "tollgate:sched:run_s"
WAIT_KEY: Final = "tollgate:sched:wait:{plan}"
RUN_S_ALPHA: Final = 0.2
WORKERS_MAX: Final = 10_000
# Upper bounds of the queue-wait histogram (seconds); "+Inf" and "sum" are fields too.
WAIT_BUCKETS_S: Final = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


@dataclass(frozen=True)
class WorkerSlots:
    hostname: str
    queues: tuple[str, ...]
    concurrency: int

    def member(self) -> str:
        return json.dumps(
            {
                "hostname": self.hostname,
                "queues": list(self.queues),
                "concurrency": self.concurrency,
            },
            sort_keys=True,
        )


def announce(redis: Any, worker: WorkerSlots, ttl_s: float, now_s: float | None = None) -> None:
    redis.zadd(SLOTS_KEY, {worker.member(): (now_s or time.time()) + ttl_s})


def withdraw(redis: Any, worker: WorkerSlots) -> None:
    redis.zrem(SLOTS_KEY, worker.member())


def live(redis: Any, now_s: float | None = None) -> list[WorkerSlots]:
    """Workers whose announcement has not expired (expired ones are removed)."""
    pipe = redis.pipeline(transaction=False)
    pipe.zremrangebyscore(SLOTS_KEY, "-inf", now_s or time.time())
    pipe.zrange(SLOTS_KEY, 0, WORKERS_MAX - 1)
    _, members = pipe.execute()
    workers = []
    for raw in members:
        try:
            data = json.loads(raw)
            workers.append(
                WorkerSlots(str(data["hostname"]), tuple(data["queues"]), int(data["concurrency"]))
            )
        except (ValueError, KeyError, TypeError):
            continue
    return workers


def slots_per_queue(workers: Iterable[WorkerSlots], buffer_per_worker: int = 0) -> dict[str, int]:
    """Live slots each queue could use (+ a buffer per worker). A worker serving several
    queues counts towards each here; `pools` shares its concurrency between them."""
    out: dict[str, int] = defaultdict(int)
    for worker in workers:
        for queue in worker.queues:
            out[queue] += worker.concurrency + buffer_per_worker
    return dict(out)


@dataclass(frozen=True)
class Pool:
    """Queues that share workers (a connected group): at most `capacity` jobs in flight
    over all of them (each worker's concurrency + buffer counted once), and at most
    `slots[q]` on queue q (what the workers serving q have)."""

    queues: tuple[str, ...]
    slots: dict[str, int]
    capacity: int


def pools(
    workers: Iterable[WorkerSlots], buffer_per_worker: int = 0, only: Iterable[str] | None = None
) -> list[Pool]:
    """The live workers' queues (those in `only`, when given) grouped into pools."""
    keep = None if only is None else set(only)
    parent: dict[str, str] = {}

    def root(q: str) -> str:
        while parent[q] != q:
            parent[q] = parent[parent[q]]
            q = parent[q]
        return q

    served: list[tuple[tuple[str, ...], int]] = []
    for worker in workers:
        queues = tuple(sorted(q for q in set(worker.queues) if keep is None or q in keep))
        if not queues:
            continue
        served.append((queues, worker.concurrency + buffer_per_worker))
        for q in queues:
            parent.setdefault(q, q)
        for q in queues[1:]:
            parent[root(q)] = root(queues[0])
    slots: dict[str, int] = defaultdict(int)
    capacity: dict[str, int] = defaultdict(int)
    for queues, n in served:
        capacity[root(queues[0])] += n
        for q in queues:
            slots[q] += n
    members: dict[str, list[str]] = defaultdict(list)
    for q in parent:
        members[root(q)].append(q)
    return [
        Pool(tuple(sorted(qs)), {q: slots[q] for q in qs}, capacity[r])
        for r, qs in sorted(members.items(), key=lambda item: min(item[1]))
    ]


def record_run(redis: Any, task: str, seconds: float) -> None:
    """Fold one run into the family's mean (a lost update only blurs an estimate)."""
    old = redis.hget(RUN_S_KEY, task)
    mean = seconds if old is None else (1 - RUN_S_ALPHA) * float(old) + RUN_S_ALPHA * seconds
    redis.hset(RUN_S_KEY, task, f"{mean:.6f}")


def mean_run_s(redis: Any) -> dict[str, float]:
    return {str(k): float(v) for k, v in (redis.hgetall(RUN_S_KEY) or {}).items()}


def record_waits(redis: Any, waits: Iterable[tuple[str, float]]) -> None:
    """Count queue waits (plan, seconds) into cumulative histogram buckets."""
    pipe = redis.pipeline(transaction=False)
    for plan, wait_s in waits:
        key = WAIT_KEY.format(plan=plan)
        for bound in WAIT_BUCKETS_S:
            if wait_s <= bound:
                pipe.hincrby(key, str(bound), 1)
        pipe.hincrby(key, "+Inf", 1)
        pipe.hincrbyfloat(key, "sum", wait_s)
    pipe.execute()


def wait_histogram(redis: Any, plan: str) -> tuple[list[tuple[str, float]], float]:
    """(cumulative buckets as (le, count), sum) for the plan."""
    raw = {
        (k.decode() if isinstance(k, bytes) else str(k)): float(v)
        for k, v in (redis.hgetall(WAIT_KEY.format(plan=plan)) or {}).items()
    }
    buckets = [(str(b), raw.get(str(b), 0.0)) for b in WAIT_BUCKETS_S]
    buckets.append(("+Inf", raw.get("+Inf", 0.0)))
    return buckets, raw.get("sum", 0.0)
