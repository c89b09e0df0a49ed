"""The queue-wait histogram and the run-time mean, each written by one Lua script call
(real Redis): the same buckets, sum and mean as the per-command code they replace."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import redis

from orchestrator.scheduling import slots


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def test_waits_fill_cumulative_buckets_and_the_sum(client: redis.Redis) -> None:
    plan, other = f"test-{secrets.token_hex(3)}", f"test-{secrets.token_hex(3)}"
    waits = [0.0, 0.1, 0.1000001, 2.5, 59.9, 4000.0]
    try:
        slots.record_waits(client, [(plan, w) for w in waits] + [(other, 1.0)])
        slots.record_waits(client, [])  # nothing to count: no call
        buckets, total = slots.wait_histogram(client, plan)
        expected = [(str(b), float(sum(w <= b for w in waits))) for b in slots.WAIT_BUCKETS_S]
        assert buckets == [*expected, ("+Inf", float(len(waits)))]
        assert total == pytest.approx(sum(waits))
        assert slots.wait_histogram(client, other)[0][-1] == ("+Inf", 1.0)
    finally:
        client.delete(slots.WAIT_KEY.format(plan=plan), slots.WAIT_KEY.format(plan=other))


def test_the_run_mean_starts_at_the_first_run_then_folds_in_each_next(
    client: redis.Redis,
) -> None:
    task = f"test-{secrets.token_hex(3)}"
    try:
        slots.record_run(client, task, 2.0)
        assert client.hget(slots.RUN_S_KEY, task) == "2.000000"
        slots.record_run(client, task, 7.0)
        mean = (1 - slots.RUN_S_ALPHA) * 2.0 + slots.RUN_S_ALPHA * 7.0
        assert client.hget(slots.RUN_S_KEY, task) == f"{mean:.6f}"
        assert slots.mean_run_s(client)[task] == pytest.approx(mean)
    finally:
        client.hdel(slots.RUN_S_KEY, task)


def test_runs_folded_together_give_what_one_by_one_gives(client: redis.Redis) -> None:
    one, many, other = (f"test-{secrets.token_hex(3)}" for _ in range(3))
    runs = [2.0, 7.0, 0.5, 3.25]
    try:
        for seconds in runs:
            slots.record_run(client, one, seconds)
        slots.record_runs(client, [(many, s) for s in runs] + [(other, 9.0)])
        assert client.hget(slots.RUN_S_KEY, many) == client.hget(slots.RUN_S_KEY, one)
        assert client.hget(slots.RUN_S_KEY, other) == "9.000000"
        slots.record_runs(client, [])  # nothing to send
    finally:
        client.hdel(slots.RUN_S_KEY, one, many, other)
