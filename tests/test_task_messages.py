"""The fast dispatch publisher (orchestrator.scheduling.task_messages) against the installed
celery and kombu on real Redis: its task message and task-sent event equal, field by field,
what `send_task` writes for the same call; a real worker runs a job it dispatched; and
`Publisher.many` pipelines dispatches with events, in order, counting a partial failure."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
import redis
from celery._state import _task_stack
from celery.signals import before_task_publish
from sqlalchemy import Engine

from orchestrator.events import EVENTS_STREAM
from orchestrator.scheduling.dispatch import Publisher, celery_for
from orchestrator.scheduling.task_messages import fanout_topic, list_key
from orchestrator.storage import Storage
from tests.ledger_helpers import grant, new_account
from tests.lifecycle_helpers import submit, wait_terminal
from tests.support.services import celery_worker

QUEUE = "test.fastpub"  # a queue of this module's own: no worker consumes it
TASK = "tollgate.txt2img"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def decoded(raw: Any) -> dict[str, Any]:
    """A kombu Redis message with its base64 body decoded (JSON)."""
    message: dict[str, Any] = json.loads(raw)
    assert message["properties"]["body_encoding"] == "base64"
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def ids(client: redis.Redis, key: str) -> list[str]:
    """The task ids on list `key`, oldest first (kombu LPUSHes)."""
    raw: list[Any] = client.lrange(key, 0, -1)  # type: ignore[assignment]
    return [decoded(m)["headers"]["id"] for m in raw[::-1]]


def per_message(message: dict[str, Any]) -> dict[str, Any]:
    """Pop the values that differ between two sends of the same task; checked by shape."""
    tag = message["properties"].pop("delivery_tag")
    assert UUID.fullmatch(tag), tag
    body = message["body"]
    if isinstance(body, dict) and body.get("type") == "task-sent":
        assert isinstance(body.pop("timestamp"), float)
        assert isinstance(body.pop("clock"), int)
    return message


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.delete(QUEUE, EVENTS_STREAM, "gpu.txt2img", "gpu.train")
    yield client
    client.delete(QUEUE, EVENTS_STREAM, "gpu.txt2img", "gpu.train")
    client.close()


@pytest.fixture
def sent_events(client: redis.Redis, redis_url: str) -> Iterator[Any]:
    """Subscribed to the channel of task-sent events; `take(n)` reads n of them."""
    db = client.connection_pool.connection_kwargs["db"]
    topic = fanout_topic(db, "celeryev", "task.sent")
    assert topic == f"/{db}.celeryev/task.sent"
    pubsub = client.pubsub()
    pubsub.subscribe(topic)
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"  # type: ignore[index]

    def take(n: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < n and time.monotonic() < deadline:
            m = pubsub.get_message(timeout=0.2)
            if m is not None and m["type"] == "message":
                got.append(decoded(m["data"]))
        return got

    yield take
    pubsub.close()


@contextmanager
def running_task(app: Any) -> Iterator[None]:
    """As inside a worker's task (the beat-driven dispatch pass): tasks sent name it."""
    task = app.tasks["celery.backend_cleanup"]
    task.push_request(id="job_parent", root_id="job_root", called_directly=False)
    _task_stack.push(task)
    try:
        yield
    finally:
        _task_stack.pop()
        task.pop_request()


@pytest.mark.parametrize(
    ("task_id", "in_task"),
    [("job_fast1", False), ("job_fast1:render:1", False), ("job_fast1", True)],
)
def test_the_task_message_and_its_event_are_celerys(
    client: redis.Redis, redis_url: str, sent_events: Any, task_id: str, in_task: bool
) -> None:
    publish = Publisher(redis_url)
    assert publish.tasks is not None and publish.tasks.usable()
    with running_task(publish.celery) if in_task else nullcontext():
        publish.celery.send_task(
            TASK,
            args=["job_fast1"],
            task_id=task_id,
            queue=QUEUE,
            soft_time_limit=600,
            time_limit=660,
        )
        key, message, event = publish.tasks.build(TASK, QUEUE, 660, 600, "job_fast1", task_id)
    assert key == QUEUE and event is not None
    publish._send([(key, message, event)])
    raw: list[Any] = client.lrange(QUEUE, 0, -1)  # type: ignore[assignment]
    ours, theirs = (decoded(m) for m in raw)  # LPUSHed: the newest first
    assert theirs["headers"]["origin"] == ours["headers"]["origin"]  # (the same process)
    assert per_message(ours) == per_message(theirs)
    assert list(ours["headers"]) == list(theirs["headers"])  # the same order, too
    assert ours["body"] == [
        ["job_fast1"],
        {},
        dict.fromkeys(["callbacks", "errbacks", "chain", "chord"]),
    ]
    their_event, our_event = sent_events(2)
    assert our_event["body"]["clock"] > their_event["body"]["clock"]  # the app's own clock
    assert abs(our_event["body"]["timestamp"] - time.time()) < 60
    assert per_message(our_event) == per_message(their_event)
    assert our_event["body"]["uuid"] == task_id and our_event["body"]["queue"] == QUEUE
    parent = ("job_root", "job_parent") if in_task else (task_id, None)
    assert (ours["headers"]["root_id"], ours["headers"]["parent_id"]) == parent


def test_priorities_use_kombus_list_keys(client: redis.Redis, redis_url: str) -> None:
    app = celery_for(redis_url)
    for priority in (0, 2, 3, 5, 9):
        app.send_task(TASK, args=["job_p"], queue=QUEUE, priority=priority)
        assert client.llen(list_key(QUEUE, priority)) == 1, priority
        client.delete(list_key(QUEUE, priority))


def test_many_pipelines_dispatches_and_events_in_order(
    client: redis.Redis, redis_url: str, sent_events: Any
) -> None:
    publish = Publisher(redis_url)
    messages = [
        ("event", {"job_id": "job_a", "status": "queued"}),
        ("dispatch", {"job_id": "job_a", "type": "txt2img"}),
        ("dispatch", {"job_id": "job_b", "type": "tune"}),
        ("event", {"job_id": "job_b", "status": "queued"}),
        ("dispatch", {"job_id": "job_c", "type": "txt2img"}),
        ("dispatch", {"job_id": "job_d", "type": "no_such_type"}),  # fails: nothing after it
        ("event", {"job_id": "job_e", "status": "queued"}),
    ]
    assert publish.many(messages) == 5
    entries: list[Any] = client.xrange(EVENTS_STREAM)  # type: ignore[assignment]
    stream = [fields[b"job_id"].decode() for _, fields in entries]
    assert stream == ["job_a", "job_b"]
    assert ids(client, "gpu.txt2img") == ["job_a", "job_c"]
    assert ids(client, "gpu.train") == ["job_b:train"]
    events = [e["body"]["uuid"] for e in sent_events(3)]
    assert events == ["job_a", "job_b:train", "job_c"]
    # More than one pipeline's worth: all sent, in order.
    client.delete("gpu.txt2img")
    many = [("dispatch", {"job_id": f"job_{i}", "type": "txt2img"}) for i in range(450)]
    assert publish.many(many) == 450
    assert ids(client, "gpu.txt2img") == [f"job_{i}" for i in range(450)]


def test_publish_signal_receivers_get_celerys_own_path(client: redis.Redis, redis_url: str) -> None:
    seen: list[str] = []

    def receiver(sender: Any = None, headers: Any = None, **_: Any) -> None:
        seen.append(headers["id"])

    before_task_publish.connect(receiver, weak=False)
    try:
        publish = Publisher(redis_url)
        publish("dispatch", {"job_id": "job_sig1", "type": "txt2img"})
        assert publish.many([("dispatch", {"job_id": "job_sig2", "type": "txt2img"})]) == 1
    finally:
        before_task_publish.disconnect(receiver)
    assert seen == ["job_sig1", "job_sig2"]
    assert ids(client, "gpu.txt2img") == ["job_sig1", "job_sig2"]


@pytest.fixture(scope="module")
def worker(
    service_env: dict[str, str], settings_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    with celery_worker(service_env, tmp_path_factory.mktemp("logs")) as proc:
        yield proc


def test_a_worker_runs_a_job_the_fast_path_dispatched(
    pg_engine: Engine, storage: Storage, redis_url: str, worker: Any, sent_events: Any
) -> None:
    assert Publisher(redis_url).tasks is not None  # the nudge below publishes through it
    account = new_account(pg_engine)
    grant(pg_engine, account, 5)
    spec = {"type": "txt2img", "prompt": "a lighthouse", "width": 512, "height": 512}
    job_id = submit(pg_engine, storage, redis_url, account, {**spec, "steps": 20})
    assert wait_terminal(pg_engine, job_id).status == "succeeded"
    # Its task-sent event went out (with those of jobs earlier tests left queued, which the
    # same pass may dispatch: the database is shared).
    assert job_id in [e["body"]["uuid"] for e in sent_events(100, timeout_s=1.0)]
