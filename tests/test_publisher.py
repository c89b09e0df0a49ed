"""The outbox publisher's batch (`Publisher.many`) on real Redis: events in order, one
pipeline per run of events, and a stop at the first failure with the count sent so far."""

from __future__ import annotations

import redis

from orchestrator.events import EVENTS_STREAM
from orchestrator.scheduling.dispatch import Publisher


def stream(client: redis.Redis) -> list[str]:
    return [fields[b"job_id"].decode() for _, fields in client.xrange(EVENTS_STREAM)]


def test_many_sends_in_order_and_stops_at_the_first_failure(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.delete(EVENTS_STREAM)
    publish = Publisher(redis_url)
    messages = [
        ("event", {"job_id": "job_a", "status": "queued"}),
        ("event", {"job_id": "job_b", "status": "queued"}),
        ("dispatch", {"job_id": "job_c", "type": "txt2img"}),
        ("event", {"job_id": "job_d", "status": "running"}),
        ("bogus", {"job_id": "job_e"}),  # an unknown topic fails: nothing after it is sent
        ("event", {"job_id": "job_f", "status": "queued"}),
    ]
    assert publish.many(messages) == 4
    assert stream(client) == ["job_a", "job_b", "job_d"]
    assert client.llen("gpu.txt2img") == 1  # the dispatch went to its family's queue
    client.delete("gpu.txt2img")
