"""txt2img: Stable Diffusion (SD 1.x / SDXL) through models.ModelManager; one batched call,
per-image seeds (seed + i), per-step progress and cancellation."""

from __future__ import annotations

from typing import Any

from orchestrator.execution.protocol import JobStopped, RunContext, Runner
from workers.app import app
from workers.outputs import model_id, png_bytes
from workers.runtime import register, run_job


def make_runner() -> Runner:
    from models.errors import Canceled
    from models.manager import default_manager

    manager = default_manager()

    def run(ctx: RunContext) -> None:
        spec = ctx.spec
        model = model_id(spec, "txt2img")
        lora = None
        if spec.get("tune_id"):  # a later render from a tune: its LoRA on the base model
            from workers.tune import local_lora

            lora = str(local_lora(ctx, spec["tune_id"]))
        seeds = [spec["seed"] + i for i in range(spec["num_images"])]
        stopped: list[JobStopped] = []

        def on_step(step: int, total: int) -> bool:
            try:
                ctx.progress(step, total)
            except JobStopped as stop:
                stopped.append(stop)
                return False
            return True

        try:
            result = manager.txt2img(
                model,
                spec["prompt"],
                spec.get("negative_prompt"),
                width=spec["width"],
                height=spec["height"],
                steps=spec["steps"],
                guidance=spec["guidance"],
                seeds=seeds,
                on_step=on_step,
                lora=lora,
            )
        except Canceled:
            raise stopped[0] if stopped else JobStopped("canceled") from None
        for index, seed, image in result.delivered():
            meta = {
                "prompt": spec["prompt"],
                "seed": seed,
                "model": model,
                "steps": spec["steps"],
                "guidance": spec["guidance"],
            }
            ctx.deliver(index, png_bytes(image, meta), {"seed": seed, "model": model})
        for withheld in result.not_delivered:
            ctx.not_delivered(withheld.index, withheld.reason)

    return run


register("txt2img", make_runner)
register("tune_prompt", make_runner)


@app.task(name="tollgate.txt2img", bind=True)
def txt2img(self: Any, job_id: str) -> dict[str, Any]:
    return run_job(self, "txt2img", job_id)


@app.task(name="tollgate.tune_prompt", bind=True)
def tune_prompt(self: Any, job_id: str) -> dict[str, Any]:
    return run_job(self, "tune_prompt", job_id)
