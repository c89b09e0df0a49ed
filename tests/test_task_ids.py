"""Task ids per phase: a tune's training and render tasks have distinct ids that start with
the job id (both stay in Flower), and the task's only argument is still the job id."""

from __future__ import annotations

import json
from typing import Any

import redis

from orchestrator.jobs.families import family_for
from orchestrator.scheduling.dispatch import Publisher, task_id_for


def test_task_id_for_each_phase() -> None:
    assert task_id_for("job_a", "txt2img") == "job_a"
    assert task_id_for("job_a", "tune") == "job_a:train"
    assert task_id_for("job_a", "tune_render") == "job_a:render:1"
    ids = {task_id_for("job_a", t) for t in ("tune", "tune_render")}
    assert len(ids) == 2 and all(i.startswith("job_a") for i in ids)


def _take(client: redis.Redis, queue: str, job_id: str) -> list[dict[str, Any]]:
    """The queued messages of `job_id` on `queue`, removed from it (no worker runs them)."""
    found = []
    raw_messages: Any = client.lrange(queue, 0, -1)
    for raw in raw_messages:
        message = json.loads(raw)
        if job_id in json.dumps(message["headers"].get("argsrepr", "")):
            found.append(message["headers"])
            client.lrem(queue, 1, raw)
    return found


def test_tune_phases_are_published_under_distinct_ids(redis_url: str) -> None:
    publish = Publisher(redis_url)
    client = redis.Redis.from_url(redis_url)
    job_id = "job_taskid0123456789abcdef"
    for job_type in ("tune", "tune_render", "txt2img"):
        publish("dispatch", {"job_id": job_id, "type": job_type})
    seen = {}
    for job_type in ("tune", "tune_render", "txt2img"):
        queue = family_for(job_type).queue
        for headers in _take(client, queue, job_id):
            seen[headers["task"]] = headers
    assert seen["tollgate.tune"]["id"] == f"{job_id}:train"
    assert seen["tollgate.tune_render"]["id"] == f"{job_id}:render:1"
    assert seen["tollgate.txt2img"]["id"] == job_id
    for headers in seen.values():
        assert job_id in headers["argsrepr"] and headers["argsrepr"].count("'") == 2
    client.close()
