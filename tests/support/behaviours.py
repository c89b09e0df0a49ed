"""Test-only job behaviours (they live in the tests, not the product). A spec's "test" field
picks one: ok (default), fail, partial:K, sleep:S, slow:S (one output per S seconds),
gate (report progress until the test sets GATE_KEY, then deliver), block:S (one call of S
seconds without any progress, like a long model call, then deliver)."""

from __future__ import annotations

import io
import os
import time

import redis
from PIL import Image

from orchestrator.execution.protocol import RunContext
from orchestrator.settings import get_settings

PID_KEY = "tollgate:test:pid:{job_id}"
GATE_KEY = "tollgate:test:gate:{job_id}"
GATE_WAIT_MAX_S = 120
SLEEP_STEP_S = 0.05


def tiny_png(index: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (index * 30 % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def scripted(ctx: RunContext) -> None:
    behaviour = str(ctx.spec.get("test", "ok"))
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
