"""Test-only job behaviours (they live in the tests, not the product). A spec's "test" field
picks one: ok (default), fail, partial:K, sleep:S, slow:S (one output per S seconds),
gate (report progress until the test sets GATE_KEY, then deliver), block:S (one call of S
seconds without any progress, like a long model call, then deliver), pgkill:progress /
pgkill:finish (terminate this worker's database connections before each progress write, or
just before finish)."""

from __future__ import annotations

import io
import os
import time

import psycopg
import redis
from PIL import Image
from sqlalchemy.engine import make_url

from orchestrator.execution.protocol import PROGRESS_WRITE_INTERVAL_S, RunContext
from orchestrator.settings import get_settings

PID_KEY = "tollgate:test:pid:{job_id}"
GATE_KEY = "tollgate:test:gate:{job_id}"
GATE_WAIT_MAX_S = 120
SLEEP_STEP_S = 0.05
# Workers started with this application_name (in their database URL) are the ones pgkill
# terminates.
WORKER_APP_NAME = "tollgate-test-worker"


def terminate_worker_connections() -> int:
    """pg_terminate_backend of every connection of the test workers (not of the tests)."""
    url = make_url(get_settings().database_url)
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database, autocommit=True
    ) as conn:
        found = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (WORKER_APP_NAME,),
        ).fetchone()
    return int(found[0]) if found else 0


# A behaviour can also ride in the prompt, `test:<behaviour>` (a submitted spec refuses
# unknown fields, so a test that cannot script the stored spec in time uses this).
PROMPT_PREFIX = "test:"


def tiny_png(index: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (index * 30 % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def scripted(ctx: RunContext) -> None:
    prompt = str(ctx.spec.get("prompt", ""))
    default = prompt.removeprefix(PROMPT_PREFIX) if prompt.startswith(PROMPT_PREFIX) else "ok"
    behaviour = str(ctx.spec.get("test", default))
    name, _, arg = behaviour.partition(":")
    count = int(ctx.spec.get("num_images", 1)) if ctx.spec["type"] == "txt2img" else 1
    client = redis.Redis.from_url(get_settings().redis_url)
    client.set(PID_KEY.format(job_id=ctx.job_id), os.getpid(), ex=600)
    if name == "gate":
        deadline = time.monotonic() + GATE_WAIT_MAX_S
        while not client.exists(GATE_KEY.format(job_id=ctx.job_id)):
            if time.monotonic() > deadline:
                raise RuntimeError("gate never opened")
            ctx.progress(0, count)
            time.sleep(SLEEP_STEP_S)
    if name == "block":
        time.sleep(float(arg))
    if name == "fail":
        raise RuntimeError("scripted failure")
    if name == "pgkill":
        for index in range(count):
            if arg == "progress":
                terminate_worker_connections()
                time.sleep(PROGRESS_WRITE_INTERVAL_S + 0.05)  # the next progress writes
            ctx.progress(index + 1, count)
            ctx.deliver(index, tiny_png(index), {"seed": index})
        if arg == "finish":
            terminate_worker_connections()
        return
    if name == "sleep":
        steps = max(1, int(float(arg) / SLEEP_STEP_S))
        for step in range(1, steps + 1):
            time.sleep(SLEEP_STEP_S)
            ctx.progress(step, steps)
    if name == "slow":
        for index in range(count):
            ctx.progress(index, count)
            time.sleep(float(arg))
            ctx.progress(index, count)
            ctx.deliver(index, tiny_png(index), {"seed": index})
        ctx.progress(count, count)
        return
    undelivered = int(arg) if name == "partial" else 0
    for index in range(count):
        ctx.progress(index + 1, count)
        if index < count - undelivered:
            ctx.deliver(index, tiny_png(index), {"seed": index})
        else:
            ctx.not_delivered(index, "blocked by the safety checker")
