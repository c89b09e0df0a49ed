"""remove_background: rembg with a session created once per worker from a local model."""

from __future__ import annotations

from typing import Any

from orchestrator.execution.protocol import RunContext, Runner
from workers.app import app
from workers.outputs import model_id, open_image, png_bytes
from workers.runtime import register, run_job


def make_runner() -> Runner:
    from models.manager import default_manager

    manager = default_manager()

    def run(ctx: RunContext) -> None:
        model = model_id(ctx.spec, "remove_background")
        ctx.progress(0, 1)
        image = manager.remove_background(
            model, open_image(ctx.input_bytes()), alpha_matting=ctx.spec.get("alpha_matting")
        )
        ctx.progress(1, 1)
        ctx.deliver(0, png_bytes(image, {"model": model}), {"model": model})

    return run


register("remove_background", make_runner)


@app.task(name="tollgate.remove_background", bind=True)
def remove_background(self: Any, job_id: str) -> dict[str, Any]:
    return run_job(self, "remove_background", job_id)
