"""Celery task messages and their task-sent events, built as the installed celery (protocol 2)
and kombu's Redis transport put them on Redis for `Publisher`'s `send_task` call, but
without Celery's publish path: no producer pool, retry wrapper, new Redis client per call,
publish signals or result subscription (nobody waits on a Tollgate task's result). That path
was the biggest CPU item of a dispatch pass; here a task is one LPUSH and its event one
PUBLISH, which the caller pipelines.

What is constant for a (task, queue, limits) in a process is serialized once; a message is
that JSON text with its own values (ids, reply_to, delivery tag, body) spliced in. The
fields follow celery.app.amqp.AMQP.as_task_v2 and send_task_message, kombu's
Producer.publish and virtual Channel.basic_publish, and celery.events.EventDispatcher.
tests/test_task_messages.py compares both, field by field, with what `send_task` writes;
`TaskMessages.for_app` returns None for a configuration they do not cover (the caller then
uses `send_task`)."""

from __future__ import annotations

import base64
import json
import os
import re
import time
import uuid
from bisect import bisect
from dataclasses import dataclass
from typing import Any, Final

from celery import Celery
from celery._state import get_current_worker_task
from celery.signals import after_task_publish, before_task_publish, task_sent
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from celery.utils.time import utcoffset
from kombu.entity import DELIVERY_MODES
from kombu.transport import redis as kombu_redis

_encode_str = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_SLOT = re.compile(r'"\\u0000(\w+)\\u0000"')
# kombu transport options that change keys, topics or priorities on Redis: not covered.
WIRE_OPTIONS: Final = frozenset(
    {"global_keyprefix", "fanout_prefix", "fanout_patterns", "priority_steps"}
)
SAFE_ARGSREPR: Final = re.compile(r"[\w:.-]{1,200}")  # repr() is saferepr() for these
EMBED: Final = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def slot(name: str) -> str:
    """A placeholder for a `Template` shape (json encodes NUL as \\u0000)."""
    return f"\x00{name}\x00"


def encode(value: Any) -> str:
    return _encode_str(value) if isinstance(value, str) else json.dumps(value)


class Template:
    """The JSON text of `shape` with its `slot`s left open; `fill` splices in JSON text."""

    def __init__(self, shape: Any) -> None:
        parts = _SLOT.split(json.dumps(shape))
        self.chunks = parts[0::2]
        self.names = parts[1::2]

    def fill(self, values: dict[str, str]) -> str:
        out = [self.chunks[0]]
        for name, chunk in zip(self.names, self.chunks[1:], strict=True):
            out += (values[name], chunk)
        return "".join(out)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def list_key(queue: str, priority: int = 0) -> str:
    """The Redis list kombu LPUSHes a message of `priority` to (Channel._q_for_pri)."""
    channel = kombu_redis.Channel
    priority = max(min(priority, channel.max_priority), channel.min_priority)
    steps = kombu_redis.PRIORITY_STEPS
    step = steps[bisect(steps, priority) - 1]
    return f"{queue}{channel.sep}{step}" if step else queue


def fanout_topic(db: int, exchange: str, routing_key: str) -> str:
    """The channel kombu PUBLISHes a fanout message to (fanout prefix and patterns on)."""
    return f"{kombu_redis.Channel.keyprefix_fanout.format(db=db)}{exchange}/{routing_key}"


def envelope(body: str, headers: Any, delivery_mode: int, exchange: str, key: str) -> Any:
    """kombu's message dict after Channel._inplace_augment_message (body base64)."""
    return {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "delivery_mode": delivery_mode,
            "delivery_info": {"exchange": exchange, "routing_key": key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": slot("tag"),
        },
    }


@dataclass(frozen=True)
class Shapes:
    """One (task, queue, limits)'s templates in this process."""

    key: str
    body: Template
    message: Template
    event_body: Template
    event: Template


class TaskMessages:
    """Builds the LPUSH (and PUBLISH) of a `send_task(name, args=[job_id], task_id=...,
    queue=..., soft_time_limit=..., time_limit=...)` for one Celery app."""

    def __init__(self, app: Celery, db: int) -> None:
        self.app = app
        self.topic = fanout_topic(db, app.conf.event_exchange, "task.sent")
        self._shapes: dict[tuple[Any, ...], Shapes] = {}

    @classmethod
    def for_app(cls, app: Celery, db: int) -> TaskMessages | None:
        conf = app.conf
        covered = (
            conf.task_protocol == 2
            and conf.task_serializer == "json"
            and conf.event_serializer == "json"
            and not conf.task_compression
            and not conf.task_inherit_parent_priority
            and str(conf.broker_url).startswith(("redis://", "rediss://"))
            and not WIRE_OPTIONS & set(conf.broker_transport_options or {})
        )
        return cls(app, db) if covered else None

    def usable(self) -> bool:
        """False while anything listens to Celery's publish signals (they would be skipped)."""
        return not (before_task_publish.receivers or after_task_publish.receivers) and not (
            task_sent.receivers
        )

    def shapes(self, name: str, queue: str, time_limit: int, soft_time_limit: int) -> Shapes:
        pid = os.getpid()  # origin, hostname and pid change in a forked child
        cache_key = (name, queue, time_limit, soft_time_limit, pid)
        found = self._shapes.get(cache_key)
        if found is None:
            found = self._shapes[cache_key] = self._build(
                name, queue, time_limit, soft_time_limit, pid
            )
        return found

    def _build(self, name: str, queue: str, time_limit: int, soft: int, pid: int) -> Shapes:
        declared = self.app.amqp.queues[queue]
        if declared.exchange.type != "direct":
            raise ValueError(f"queue {queue!r}: only direct exchanges are covered")
        mode = declared.exchange.delivery_mode or self.app.conf.task_default_delivery_mode
        origin = anon_nodename()
        headers = {
            "lang": "py",
            "task": name,
            "id": slot("id"),
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [time_limit, soft],
            "root_id": slot("root"),
            "parent_id": slot("parent"),
            "argsrepr": slot("argsrepr"),
            "kwargsrepr": "{}",
            "origin": origin,
            "ignore_result": None,  # send_task's default: the task's own setting applies
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        # Anon exchange: a direct queue's messages go straight to its list (routing key).
        message = envelope(slot("body"), headers, DELIVERY_MODES.get(mode, mode), "", queue)
        message["properties"] = {
            "correlation_id": slot("id"),
            "reply_to": slot("reply_to"),
            **message["properties"],
        }
        event_fields = {
            "hostname": origin,
            "utcoffset": slot("utcoffset"),
            "pid": pid,
            "clock": slot("clock"),
            "uuid": slot("id"),
            "root_id": slot("root"),
            "parent_id": slot("parent"),
            "name": name,
            "args": slot("argsrepr"),
            "kwargs": "{}",
            "retries": 0,
            "eta": None,
            "expires": None,
            "queue": queue,
            "exchange": "",
            "routing_key": queue,
            "timestamp": slot("timestamp"),
            "type": "task-sent",
        }
        exchange = self.app.conf.event_exchange
        event = envelope(slot("body"), {"hostname": origin}, 1, exchange, "task.sent")
        return Shapes(
            key=list_key(queue),
            body=Template([[slot("job")], {}, EMBED]),
            message=Template(message),
            event_body=Template(event_fields),
            event=Template(event),
        )

    def build(
        self, name: str, queue: str, time_limit: int, soft: int, job_id: str, task_id: str
    ) -> tuple[str, str, str | None]:
        """(list key, message, task-sent event or None when the app sends none)."""
        shapes = self.shapes(name, queue, time_limit, soft)
        root_id, parent_id = task_id, None
        parent = get_current_worker_task()  # a task sent from a task: its root and parent
        if parent is not None:
            root_id = parent.request.root_id or parent.request.id
            parent_id = parent.request.id
        argsrepr = (
            repr([job_id])
            if SAFE_ARGSREPR.fullmatch(job_id)
            else saferepr([job_id], self.app.amqp.argsrepr_maxsize)
        )
        values = {
            "id": _encode_str(task_id),
            "root": encode(root_id),
            "parent": encode(parent_id),
            "argsrepr": _encode_str(argsrepr),
            "reply_to": _encode_str(self.app.thread_oid),
            "job": _encode_str(job_id),
            "tag": _encode_str(str(uuid.uuid4())),
        }
        values["body"] = '"' + b64(shapes.body.fill(values)) + '"'
        message = shapes.message.fill(values)
        if not self.app.conf.task_send_sent_event:
            return shapes.key, message, None
        values["utcoffset"] = json.dumps(utcoffset())
        values["clock"] = str(self.app.clock.forward())
        values["timestamp"] = repr(time.time())
        values["body"] = '"' + b64(shapes.event_body.fill(values)) + '"'
        values["tag"] = _encode_str(str(uuid.uuid4()))
        return shapes.key, message, shapes.event.fill(values)
