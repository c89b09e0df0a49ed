"""face_enhance: GFPGAN's full pipeline (detect, align, restore, paste back). No face found
is a failed job with that reason, and so refunded."""

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
        model = model_id(ctx.spec, "face_enhance")
        ctx.progress(0, 1)
        result = manager.face_enhance(model, open_image(ctx.input_bytes()))
        ctx.progress(1, 1)
        meta = {"model": model, "faces": result.faces_restored}
        ctx.deliver(0, png_bytes(result.image, meta), meta)

    return run


register("face_enhance", make_runner)


@app.task(name="tollgate.face_enhance", bind=True)
def face_enhance(self: Any, job_id: str) -> dict[str, Any]:
    return run_job(self, "face_enhance", job_id)
