"""Publishing outbox messages: Celery tasks for dispatch and callbacks, Redis stream entries
for events. The task's only argument is the job id, so Flower and broker dumps never show
prompts, images or keys. The task id is the job id, or for a tune's phases the job id and
the phase (`task_id_for`): both stay visible in Flower, and a re-publish of the same phase
reuses its id (every consumer is idempotent on the job id and the job's status anyway).
A dispatch task goes out as the message Celery would write (task_messages.py), one LPUSH
and its task-sent event's PUBLISH in a pipeline, not through `send_task`."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from functools import lru_cache, partial
from typing import Any, Final

import redis
from celery import Celery

from orchestrator.events import append_event
from orchestrator.faults import retry_redis
from orchestrator.jobs.families import CALLBACK_QUEUE, CALLBACK_TASK, family_for
from orchestrator.scheduling.task_messages import TaskMessages
from orchestrator.settings import get_settings

log = logging.getLogger(__name__)

# Job type of a dispatch -> the phase suffix of its task id.
PHASE_SUFFIXES: Final = {"tune": "train", "tune_render": "render"}


def task_id_for(job_id: str, job_type: str, render: int = 1) -> str:
    """`job_x` for a plain job; `job_x:train`, `job_x:render:1` for a tune's phases."""
    suffix = PHASE_SUFFIXES.get(job_type)
    if suffix is None:
        return job_id
    return f"{job_id}:{suffix}:{render}" if suffix == "render" else f"{job_id}:{suffix}"


@lru_cache(maxsize=4)
def celery_for(redis_url: str) -> Celery:
    from workers.celery_config import make_celery

    return make_celery(redis_url, include=())


# A Redis that stopped answering (not one that refuses) fails a call after this long.
REDIS_SOCKET_TIMEOUT_S = 5.0
REDIS_CONNECT_TIMEOUT_S = 2.0
# Messages sent in one Redis pipeline: one relay batch (outbox.RELAY_BATCH_MAX).
MESSAGES_PER_PIPELINE_MAX: Final = 200


@lru_cache(maxsize=4)
def redis_for(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(
        redis_url,
        decode_responses=True,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
    )


@lru_cache(maxsize=4)
def task_messages_for(redis_url: str) -> TaskMessages | None:
    db = int(redis_for(redis_url).connection_pool.connection_kwargs.get("db") or 0)
    return TaskMessages.for_app(celery_for(redis_url), db)


# One message ready for a pipeline: an event's payload (XADD), or a task's list key, its
# message (LPUSH) and its task-sent event (PUBLISH, None when the app sends none).
Built = dict[str, Any] | tuple[str, str, str | None]


class Publisher:
    def __init__(self, redis_url: str) -> None:
        self.celery = celery_for(redis_url)
        self.redis = redis_for(redis_url)
        self.tasks = task_messages_for(redis_url)

    def __call__(self, topic: str, payload: dict[str, Any]) -> None:
        """Publish one outbox message; transient Redis faults are retried briefly (then the
        caller's transaction rolls back and the re-publisher sends it later)."""
        retry_redis(lambda: self._publish(topic, payload))

    def many(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> int:
        """Publish `messages` in order; returns how many were sent before the first failure
        (logged; the rest stay for the re-publisher). Consecutive events and dispatches share
        one Redis pipeline (one round trip instead of an XADD, or an LPUSH and a PUBLISH,
        each), up to MESSAGES_PER_PIPELINE_MAX."""
        piped = ("event", "dispatch") if self._fast() else ("event",)
        sent = 0
        while sent < len(messages):
            topic, payload = messages[sent]
            try:
                if topic not in piped:
                    self(topic, payload)
                    sent += 1
                    continue
                run = itertools.takewhile(lambda m: m[0] in piped, messages[sent:])
                built = self._build(list(itertools.islice(run, MESSAGES_PER_PIPELINE_MAX)))
                retry_redis(partial(self._send, built))
                sent += len(built)
            except Exception:
                log.warning("outbox publish failed; the re-publisher will send it", exc_info=True)
                break
        return sent

    def _fast(self) -> bool:
        return self.tasks is not None and self.tasks.usable()

    def _build(self, run: list[tuple[str, dict[str, Any]]]) -> list[Built]:
        """`run`'s pipeline entries, up to the first that cannot be built (raised when it is
        the first: the caller stops there)."""
        built: list[Built] = []
        for topic, payload in run:
            try:
                built.append(payload if topic == "event" else self._task(payload))
            except Exception:
                if not built:
                    raise
                break
        return built

    def _task(self, payload: dict[str, Any]) -> tuple[str, str, str | None]:
        assert self.tasks is not None
        family = family_for(payload["type"])
        return self.tasks.build(
            family.task_name,
            family.queue,
            family.time_limit_s,
            family.soft_time_limit_s,
            payload["job_id"],
            task_id_for(payload["job_id"], payload["type"]),
        )

    def _send(self, built: list[Built]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for entry in built:
            if isinstance(entry, dict):
                append_event(pipe, entry)
                continue
            key, message, event = entry
            pipe.lpush(key, message)
            if event is not None:
                assert self.tasks is not None
                pipe.publish(self.tasks.topic, event)
        pipe.execute()

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        if topic == "dispatch" and self._fast():
            self._send([self._task(payload)])
        elif topic == "dispatch":
            family = family_for(payload["type"])
            self.celery.send_task(
                family.task_name,
                args=[payload["job_id"]],
                task_id=task_id_for(payload["job_id"], payload["type"]),
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
