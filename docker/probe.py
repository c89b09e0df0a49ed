"""Container probes and the GPU worker's preStop drain (copied into both images).

    python probe.py worker   # this container's Celery node answers a ping (exit 0) or not (1)
    python probe.py drain    # stop consuming, then wait until this node runs no task
    python probe.py intake   # this container's intake consumer read the stream recently
    python probe.py beat     # celery beat synced its schedule file recently

The worker's node name is ``$TOLLGATE_WORKER_NODE@<hostname>`` (``-n worker@%h``); the
intake consumer's default name is ``<hostname>-<pid>``; beat runs with
``-s $TOLLGATE_BEAT_SCHEDULE`` (default /tmp/beat/schedule).
"""

from __future__ import annotations

import glob
import os
import socket
import sys
import time

PING_TIMEOUT_S = 5.0
INTAKE_MAX_IDLE_MS = 120_000
BEAT_MAX_AGE_S = 600
DRAIN_POLL_S = 5.0


def node_name() -> str:
    return f"{os.environ.get('TOLLGATE_WORKER_NODE', 'worker')}@{socket.gethostname()}"


def _app():  # type: ignore[no-untyped-def]
    from workers.app import app

    return app


def worker() -> int:
    node = node_name()
    replies = _app().control.ping(destination=[node], timeout=PING_TIMEOUT_S)
    ok = any(node in reply for reply in replies)
    print(f"{node}: {'pong' if ok else 'no reply'}")
    return 0 if ok else 1


def drain() -> int:
    """preStop: cancel every queue this node consumes so it takes no new task, then block
    until its running task (if any) has finished. The kubelet sends SIGTERM afterwards and
    Celery's warm shutdown exits at once. terminationGracePeriodSeconds bounds the wait."""
    app, node = _app(), node_name()
    inspect = app.control.inspect(destination=[node], timeout=PING_TIMEOUT_S)
    queues = (inspect.active_queues() or {}).get(node, [])
    for queue in queues:
        app.control.cancel_consumer(queue["name"], destination=[node], reply=True)
        print(f"{node}: stopped consuming {queue['name']}", flush=True)
    while True:
        active = inspect.active()
        if active is None:  # the node no longer answers: nothing left to wait for
            return 0
        running = active.get(node, [])
        if not running:
            print(f"{node}: drained", flush=True)
            return 0
        print(f"{node}: waiting for {[t['id'] for t in running]}", flush=True)
        time.sleep(DRAIN_POLL_S)


def intake() -> int:
    import redis

    from orchestrator.ingress.streams import GROUP, JOBS_STREAM
    from orchestrator.settings import get_settings

    client = redis.Redis.from_url(get_settings().redis_url, socket_timeout=PING_TIMEOUT_S)
    host = socket.gethostname()
    consumers = client.xinfo_consumers(JOBS_STREAM, GROUP)
    mine = [
        c
        for c in consumers
        if str(c["name"], "utf-8") == host or str(c["name"], "utf-8").startswith(f"{host}-")
    ]
    idle = min((int(c["idle"]) for c in mine), default=None)
    print(f"intake consumer {host}: idle {idle} ms")
    return 0 if idle is not None and idle < INTAKE_MAX_IDLE_MS else 1


def beat() -> int:
    path = os.environ.get("TOLLGATE_BEAT_SCHEDULE", "/tmp/beat/schedule")
    files = glob.glob(f"{path}*")
    age = min((time.time() - os.path.getmtime(f) for f in files), default=None)
    print(f"beat schedule {path}: synced {age} s ago")
    return 0 if age is not None and age < BEAT_MAX_AGE_S else 1


def main(argv: list[str]) -> int:
    commands = {"worker": worker, "drain": drain, "intake": intake, "beat": beat}
    if len(argv) != 2 or argv[1] not in commands:
        print(f"usage: probe.py {{{'|'.join(commands)}}}", file=sys.stderr)
        return 2
    try:
        return commands[argv[1]]()
    except Exception as exc:  # a probe reports, it does not crash with a traceback
        print(f"probe {argv[1]} failed: {exc!r}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
