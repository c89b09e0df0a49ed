"""Celery app for bench/lifecycle.py: the product's tasks with a runner that delivers one
8x8 PNG (the cheapest job that still commits its hold), plus a raw no-op task (baseline)."""

from __future__ import annotations

import io

from PIL import Image

import workers.txt2img  # noqa: F401  (the product task, before its runner is replaced)
from orchestrator.execution.protocol import RunContext
from workers.app import app
from workers.runtime import register

_buf = io.BytesIO()
Image.new("RGB", (8, 8)).save(_buf, format="PNG")
PNG = _buf.getvalue()


def deliver_one(ctx: RunContext) -> None:
    ctx.progress(1, 1)
    ctx.deliver(0, PNG, {"seed": ctx.spec.get("seed", 0)})


register("txt2img", lambda: deliver_one)


@app.task(name="bench.noop", ignore_result=False)  # the baseline waits on results
def noop() -> int:
    return 0


__all__ = ["app"]
