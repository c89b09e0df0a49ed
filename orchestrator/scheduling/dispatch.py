"""Publishing outbox messages: Celery tasks for dispatch and callbacks, Redis stream entries
for events. The task id is the job id; the task's only argument is the job id, so Flower and
broker dumps never show prompts, images or keys."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import redis
from celery import Celery

from orchestrator.events import append_event
from orchestrator.faults import retry_redis
from orchestrator.jobs.families import CALLBACK_QUEUE, CALLBACK_TASK, family_for
from orchestrator.settings import get_settings


@lru_cache(maxsize=4)
def celery_for(redis_url: str) -> Celery:
    from workers.celery_config import make_celery

    return make_celery(redis_url, include=())


# A Redis that stopped answering (not one that refuses) fails a call after this long.
REDIS_SOCKET_TIMEOUT_S = 5.0
REDIS_CONNECT_TIMEOUT_S = 2.0


@lru_cache(maxsize=4)
def redis_for(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(
        redis_url,
        decode_responses=True,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
    )


class Publisher:
    def __init__(self, redis_url: str) -> None:
        self.celery = celery_for(redis_url)
        self.redis = redis_for(redis_url)

    def __call__(self, topic: str, payload: dict[str, Any]) -> None:
        """Publish one outbox message; transient Redis faults are retried briefly (then the
        caller's transaction rolls back and the re-publisher sends it later)."""
        retry_redis(lambda: self._publish(topic, payload))

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        if topic == "dispatch":
            family = family_for(payload["type"])
            self.celery.send_task(
                family.task_name,
                args=[payload["job_id"]],
                task_id=payload["job_id"],
                queue=family.queue,
                soft_time_limit=family.soft_time_limit_s,
                time_limit=family.time_limit_s,
            )
        elif topic == "event":
            append_event(self.redis, payload)
        elif topic == "callback":
            self.celery.send_task(
                CALLBACK_TASK,
                args=[payload["webhook_id"]],
                kwargs={"payload": payload},
                queue=CALLBACK_QUEUE,
            )
        else:
            raise ValueError(f"unknown outbox topic {topic!r}")


def get_publisher() -> Publisher:
    return Publisher(get_settings().redis_url)
