"""upscale: Real-ESRGAN x2/x4 (tiled, alpha kept) through models.ModelManager."""

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
        model = model_id(ctx.spec, f"upscale:{ctx.spec['scale']}")
        ctx.progress(0, 1)
        image = manager.upscale(model, open_image(ctx.input_bytes()))
        ctx.progress(1, 1)
        ctx.deliver(
            0,
            png_bytes(image, {"model": model, "scale": ctx.spec["scale"]}),
            {"model": model, "width": image.width, "height": image.height},
        )

    return run


register("upscale", make_runner)


@app.task(name="tollgate.upscale", bind=True)
def upscale(self: Any, job_id: str) -> dict[str, Any]:
    return run_job(self, "upscale", job_id)
