"""Tunes: DreamBooth-LoRA training (queue gpu.train) and the 64-image render (gpu.txt2img).
Both run through orchestrator.execution.protocol with the tune's phases
(orchestrator.tunes.service)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, update

from billing.db import run_transaction
from orchestrator.execution.protocol import JobStopped, RunContext, Runner
from orchestrator.jobs.styles import get_catalogue
from orchestrator.settings import get_settings
from orchestrator.tables import tunes
from orchestrator.tunes.checkpoints import StoredCheckpoint
from orchestrator.tunes.service import RENDER_PHASE, TRAINING_PHASE, get_tune
from workers.app import app
from workers.contact_sheet import contact_sheet
from workers.outputs import open_image, png_bytes
from workers.runtime import register, run_job

CHECKPOINTS_PER_RUN = 10


def _stopper(ctx: RunContext, offset: int, total: int) -> tuple[Any, list[JobStopped]]:
    """An on_step callback for the model layer that reports progress and asks to stop
    (returns False) when the job was canceled or superseded."""
    stopped: list[JobStopped] = []

    def on_step(step: int, _total: int) -> bool:
        try:
            ctx.progress(offset + step, total)
        except JobStopped as stop:
            stopped.append(stop)
            return False
        return True

    return on_step, stopped


def _record(ctx: RunContext, **values: Any) -> None:
    def work(conn: Connection) -> None:
        ctx.check_lease(conn)
        conn.execute(update(tunes).where(tunes.c.id == ctx.job_id).values(**values))

    run_transaction(ctx.engine, work)


def make_training_runner() -> Runner:
    from models.errors import Canceled
    from models.lora import LoraTrainConfig
    from models.manager import default_manager

    manager = default_manager()

    def run(ctx: RunContext) -> None:
        tune = run_transaction(ctx.engine, lambda c: get_tune(c, ctx.job_id))
        try:
            images = [open_image(ctx.storage.get(key)) for key in tune.image_keys]
        except FileNotFoundError:
            raise RuntimeError("the training photos are missing from storage") from None
        if not images:
            raise RuntimeError("no training photos (they are deleted when training ends)")
        steps = int(tune.training["steps"])
        config = LoraTrainConfig(
            token=tune.token,
            subject=tune.subject,
            steps=steps,
            rank=int(tune.training["rank"]),
            learning_rate=float(tune.training["learning_rate"]),
            seed=int(tune.seed),
            checkpoint_every=max(1, steps // CHECKPOINTS_PER_RUN),
            resolution=get_settings().tune_train_size_px,
        )
        # Checkpoints are written here and, every checkpoint_every steps, to the job's
        # storage too: a redelivery to this worker resumes from here, one the lease sweep
        # sends to another worker from storage.
        work_dir = get_settings().work_dir / "tunes" / ctx.job_id
        store = StoredCheckpoint(ctx.storage, ctx.job_id)
        on_step, stopped = _stopper(ctx, 0, steps)
        try:
            result = manager.train_lora(
                tune.base_model, images, work_dir, config, on_step=on_step, store=store
            )
        except Canceled:
            stop = stopped[0] if stopped else JobStopped("canceled")
            if stop.reason == "canceled":  # (superseded: another attempt may be here)
                shutil.rmtree(work_dir, ignore_errors=True)
            raise stop from None
        key = f"tunes/{ctx.job_id}/lora.safetensors"
        ctx.storage.put(key, result.weights.read_bytes())
        _record(ctx, lora_key=key, training={**tune.training, "resumed_from": result.resumed_from})
        shutil.rmtree(work_dir, ignore_errors=True)

    return run


def local_lora(ctx: RunContext, tune_id: str) -> Path:
    """The tune's LoRA on this worker's disk (downloaded from storage once)."""
    tune = run_transaction(ctx.engine, lambda c: get_tune(c, tune_id))
    if tune.lora_key is None or tune.weights_deleted_at is not None:
        raise RuntimeError(f"tune {tune_id} has no weights (expired or not trained)")
    path = get_settings().work_dir / "loras" / f"{tune_id}.safetensors"
    if not path.exists():
        ctx.storage.download_to(tune.lora_key, path)
    return path


def make_render_runner() -> Runner:
    from models.errors import Canceled
    from models.manager import default_manager

    manager = default_manager()
    catalogue = get_catalogue()

    def run(ctx: RunContext) -> None:
        settings = get_settings()
        tune = run_transaction(ctx.engine, lambda c: get_tune(c, ctx.job_id))
        lora = local_lora(ctx, ctx.job_id)
        styles = [catalogue.get(style_id) for style_id in tune.styles]
        steps = [min(style.steps, settings.tune_render_steps_max) for style in styles]
        size = settings.tune_render_size_px
        rows = []
        for s, style in enumerate(styles):
            on_step, stopped = _stopper(ctx, sum(steps[:s]), sum(steps))
            seeds = [int(tune.seed) + s * 8 + i for i in range(8)]
            try:
                result = manager.txt2img(
                    tune.base_model,
                    style.prompt(tune.token, tune.subject),
                    style.negative_prompt,
                    width=size,
                    height=size,
                    steps=steps[s],
                    guidance=style.guidance,
                    seeds=seeds,
                    on_step=on_step,
                    lora=str(lora),
                )
            except Canceled:
                raise stopped[0] if stopped else JobStopped("canceled") from None
            for index, seed, image in result.delivered():
                meta = {
                    "style": style.id,
                    "seed": seed,
                    "model": tune.base_model,
                    "steps": steps[s],
                    "tune": ctx.job_id,
                }
                ctx.deliver(
                    s * 8 + index, png_bytes(image, meta), {"seed": seed, "style": style.id}
                )
            for withheld in result.not_delivered:
                ctx.not_delivered(s * 8 + withheld.index, withheld.reason)
            rows.append((style.name, result.images))
        buf = io.BytesIO()
        contact_sheet(rows).save(buf, format="PNG")
        key = f"tunes/{ctx.job_id}/contact_sheet.png"
        ctx.storage.put(key, buf.getvalue())
        _record(ctx, contact_sheet_key=key)

    return run


register("tune", make_training_runner)
register("tune_render", make_render_runner)


@app.task(name="tollgate.tune", bind=True)
def tune(self: Any, job_id: str) -> dict[str, Any]:
    return run_job(self, "tune", job_id, TRAINING_PHASE)


@app.task(name="tollgate.tune_render", bind=True)
def tune_render(self: Any, job_id: str) -> dict[str, Any]:
    return run_job(self, "tune_render", job_id, RENDER_PHASE)
