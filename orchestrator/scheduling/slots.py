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
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
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
    return _workers(members)


def live_and_run_s(
    redis: Any, now_s: float | None = None
) -> tuple[list[WorkerSlots], dict[str, float]]:
    """`live` and `mean_run_s` in one round trip (the dispatcher's pass)."""
    pipe = redis.pipeline(transaction=False)
    pipe.zremrangebyscore(SLOTS_KEY, "-inf", now_s or time.time())
    pipe.zrange(SLOTS_KEY, 0, WORKERS_MAX - 1)
    pipe.hgetall(RUN_S_KEY)
    _, members, means = pipe.execute()
    return _workers(members), _means(means)


def _workers(members: Iterable[Any]) -> list[WorkerSlots]:
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


def buffer_for(
    worker: WorkerSlots,
    run_s: Mapping[str, float],
    base: int,
    lookahead_s: float,
    most: int,
    queue_of: Mapping[str, str],
) -> int:
    """Tasks dispatched beyond `worker`'s concurrency: `base`, or more for short jobs, as
    many as its slots run in `lookahead_s` (concurrency x lookahead_s / mean run seconds,
    rounded down, at most `most`), so a worker of short jobs is never starved between
    dispatch passes and one pass sends several. The mean is the longest of the families
    its queues run that have one (`tollgate:sched:run_s`); none known: `base`. A job
    arriving behind the buffer waits at most about `lookahead_s` longer for it."""
    served = set(worker.queues)
    known = [s for family, s in run_s.items() if queue_of.get(family) in served]
    if not known or lookahead_s <= 0 or most <= base:
        return base
    longest = max(known)
    if longest <= 0:
        return max(base, most)
    return max(base, min(most, math.floor(worker.concurrency * lookahead_s / longest)))


@dataclass(frozen=True)
class Pool:
    """Queues that share workers (a connected group): at most `capacity` jobs in flight
    over all of them (each worker's concurrency + buffer counted once), and at most
    `slots[q]` on queue q (what the workers serving q have). A pass dispatches only when
    at least `min_free` slots are free (1; half the buffer beyond the base when short jobs
    enlarged it: one pass then sends several jobs instead of one per job end)."""

    queues: tuple[str, ...]
    slots: dict[str, int]
    capacity: int
    min_free: int = 1


def pools(
    workers: Iterable[WorkerSlots],
    buffer_per_worker: int | Callable[[WorkerSlots], int] = 0,
    only: Iterable[str] | None = None,
    base_buffer: int | None = None,
) -> list[Pool]:
    """The live workers' queues (those in `only`, when given) grouped into pools.
    `buffer_per_worker`: a number, or a worker's buffer (`buffer_for`); what it adds
    beyond `base_buffer` per worker sets the pools' `min_free`."""
    keep = None if only is None else set(only)
    buffer = buffer_per_worker if callable(buffer_per_worker) else lambda _: buffer_per_worker
    parent: dict[str, str] = {}

    def root(q: str) -> str:
        while parent[q] != q:
            parent[q] = parent[parent[q]]
            q = parent[q]
        return q

    served: list[tuple[tuple[str, ...], int]] = []
    extra: dict[str, int] = defaultdict(int)  # per worker's first queue, then per root
    for worker in workers:
        queues = tuple(sorted(q for q in set(worker.queues) if keep is None or q in keep))
        if not queues:
            continue
        n = buffer(worker)
        served.append((queues, worker.concurrency + n))
        if base_buffer is not None:
            extra[queues[0]] += max(0, n - base_buffer)
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
    more: dict[str, int] = defaultdict(int)
    for q, n in extra.items():
        more[root(q)] += n
    members: dict[str, list[str]] = defaultdict(list)
    for q in parent:
        members[root(q)].append(q)
    return [
        Pool(tuple(sorted(qs)), {q: slots[q] for q in qs}, capacity[r], max(1, more[r] // 2))
        for r, qs in sorted(members.items(), key=lambda item: min(item[1]))
    ]


# One round trip each (the worker and the dispatcher run them per job). Lua's
# string.format("%.6f") writes the mean as Python's f"{mean:.6f}" did.
# ARGV: the weight of a new run, then (family, seconds) pairs, folded in order.
RUN_S_LUA: Final = """
local alpha = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local mean = tonumber(ARGV[i + 1])
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old then mean = (1 - alpha) * tonumber(old) + alpha * mean end
  redis.call('HSET', KEYS[1], ARGV[i], string.format('%.6f', mean))
end
"""
RUNS_PER_CALL_MAX: Final = 200  # runs per script call (a worker folds a pass's worth)
# KEYS: one histogram key per wait; ARGV: the bucket count n, the n bucket names (bounds in
# seconds), then the waits in seconds (one per key).
WAITS_LUA: Final = """
local n = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local wait = tonumber(ARGV[n + 1 + i])
  for b = 2, n + 1 do
    if wait <= tonumber(ARGV[b]) then redis.call('HINCRBY', key, ARGV[b], 1) end
  end
  redis.call('HINCRBY', key, '+Inf', 1)
  redis.call('HINCRBYFLOAT', key, 'sum', ARGV[n + 1 + i])
end
"""
WAITS_PER_CALL_MAX: Final = 200  # waits per script call (a dispatch pass sends fewer)
_scripts: dict[str, Any] = {}


def _script(redis: Any, source: str) -> Any:
    """A redis-py Script (EVALSHA, loading it on NOSCRIPT), made once per process; the
    caller passes its own client at each call."""
    if source not in _scripts:
        _scripts[source] = redis.register_script(source)
    return _scripts[source]


def record_run(redis: Any, task: str, seconds: float) -> None:
    """Fold one run into the family's mean (a lost update only blurs an estimate)."""
    record_runs(redis, [(task, seconds)])


def record_runs(redis: Any, runs: list[tuple[str, float]]) -> None:
    """Fold runs into their families' means, in order: one round trip per
    RUNS_PER_CALL_MAX runs (a worker sends those of a pass interval together)."""
    for start in range(0, len(runs), RUNS_PER_CALL_MAX):
        args: list[Any] = [RUN_S_ALPHA]
        for task, seconds in runs[start : start + RUNS_PER_CALL_MAX]:
            args += [task, repr(seconds)]
        _script(redis, RUN_S_LUA)(keys=[RUN_S_KEY], args=args, client=redis)


def mean_run_s(redis: Any) -> dict[str, float]:
    return _means(redis.hgetall(RUN_S_KEY))


def _means(raw: Mapping[Any, Any] | None) -> dict[str, float]:
    out = {}
    for k, v in (raw or {}).items():
        try:
            out[k.decode() if isinstance(k, bytes) else str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def record_waits(redis: Any, waits: Iterable[tuple[str, float]]) -> None:
    """Count queue waits (plan, seconds) into cumulative histogram buckets."""
    waits = list(waits)
    bounds = [str(b) for b in WAIT_BUCKETS_S]
    script = _script(redis, WAITS_LUA)
    for start in range(0, len(waits), WAITS_PER_CALL_MAX):
        batch = waits[start : start + WAITS_PER_CALL_MAX]
        script(
            keys=[WAIT_KEY.format(plan=plan) for plan, _ in batch],
            args=[len(bounds), *bounds, *(repr(float(w)) for _, w in batch)],
            client=redis,
        )


def wait_histogram(redis: Any, plan: str) -> tuple[list[tuple[str, float]], float]:
    """(cumulative buckets as (le, count), sum) for the plan."""
    raw = {
        (k.decode() if isinstance(k, bytes) else str(k)): float(v)
        for k, v in (redis.hgetall(WAIT_KEY.format(plan=plan)) or {}).items()
    }
    buckets = [(str(b), raw.get(str(b), 0.0)) for b in WAIT_BUCKETS_S]
    buckets.append(("+Inf", raw.get("+Inf", 0.0)))
    return buckets, raw.get("sum", 0.0)
