"""Benchmark: a tune's 64-image render as 8 batched calls of 8 versus 64 single-image calls.

On the tiny kit's sd15, in one run, with the same prompts and per-image seeds on both sides:

* batched: 8 pipeline calls of 8 images (`ModelManager.txt2img(seeds=[s, s+1, ... s+7])`,
  one prompt per call: the tune's 8 prompts);
* single: 64 calls of one image each (same prompt and seed per image).

Batched call b and its 8 single calls alternate, so a noisy neighbour hits both alike; one
warm-up of each shape runs first. Speed-up = single total / batched total. The largest pixel
difference between an image rendered batched and alone is printed as a check that batching
does not change the result (the seed decides the image, not its batch slot).

Then (unless --lora-steps 0) a tiny DreamBooth LoRA is trained with
ModelManager.train_lora on a few crops of scikit-image's astronaut (training steps/s over
the optimiser loop, and the whole call's wall time with loading and saving), and the render
comparison runs again with that LoRA loaded.

Usage: python bench/tune_render.py [--size 256] [--steps 4] [--lora-steps 20] [--kit DIR]
Without --kit the tiny kit is built into a temporary folder (15-50 s) and removed after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "sd15"
PROMPTS = (
    "a photo of sks person on a beach",
    "a photo of sks person in a forest",
    "a portrait of sks person, studio light",
    "a photo of sks person in the snow",
    "an oil painting of sks person",
    "a photo of sks person in a city at night",
    "a photo of sks person wearing a hat",
    "a watercolor of sks person",
)
BATCH_MAX = 8  # the sd15 entry's max_images
SEED_BASE = 4242


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Render:
    label: str
    batched_s: float
    single_s: float
    images: int
    calls_batched: int
    max_diff: int

    @property
    def speedup(self) -> float:
        return self.single_s / self.batched_s


def max_pixel_diff(a: Any, b: Any) -> int:
    import numpy as np

    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def render(
    mm: Any, label: str, images: int, batch: int, size: int, steps: int, lora: Path | None
) -> Render:
    def call(prompt: str, seeds: list[int]) -> tuple[float, list[Any]]:
        start = time.perf_counter()
        out = mm.txt2img(
            MODEL, prompt, width=size, height=size, steps=steps, seeds=seeds, lora=lora
        )
        return time.perf_counter() - start, out.images

    call(PROMPTS[0], list(range(batch)))  # warm-up: both shapes (and the LoRA load)
    call(PROMPTS[0], [0])
    batched_s = single_s = 0.0
    diff = 0
    for b in range(images // batch):
        prompt = PROMPTS[b % len(PROMPTS)]
        seeds = [SEED_BASE + b * batch + k for k in range(batch)]
        elapsed, together = call(prompt, seeds)
        batched_s += elapsed
        for seed, image in zip(seeds, together, strict=True):
            elapsed, alone = call(prompt, [seed])
            single_s += elapsed
            diff = max(diff, max_pixel_diff(image, alone[0]))
    log(f"{label}: batched {batched_s:.2f} s, single {single_s:.2f} s")
    return Render(label, batched_s, single_s, images, images // batch, diff)


def instance_images() -> list[Any]:
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.astronaut())  # 512x512, face around (180..330, 40..200)
    boxes = [(100, 0, 400, 300), (140, 20, 360, 240), (60, 0, 460, 400), (0, 0, 512, 512)]
    return [photo.crop(box) for box in boxes]


def train(mm: Any, out: Path, steps: int, size: int) -> tuple[float, float, int]:
    """(steps/s over the optimiser loop, whole call wall time, steps)."""
    from models.lora import LoraTrainConfig

    stamps: list[float] = []

    def on_step(step: int, total: int) -> bool:
        stamps.append(time.perf_counter())
        return True

    config = LoraTrainConfig(steps=steps, resolution=size, checkpoint_every=0, seed=7)
    start = time.perf_counter()
    mm.train_lora(MODEL, instance_images(), out, config, on_step=on_step, resume=False)
    wall = time.perf_counter() - start
    # steps 2..n over the time since step 1 ended: the loop's steady rate.
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else steps / wall
    return rate, wall, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="width = height (multiple of 8)")
    parser.add_argument("--steps", type=int, default=4, help="inference steps per image")
    parser.add_argument("--images", type=int, default=64, help="images in the render")
    parser.add_argument("--batch", type=int, default=8, help=f"images per call (<= {BATCH_MAX})")
    parser.add_argument("--lora-steps", type=int, default=20, help="LoRA training steps (0: skip)")
    parser.add_argument("--device", default=None, help="cpu, cuda... (default: $TOLLGATE_DEVICE")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--kit", type=Path, help="tiny kit folder to reuse (built if missing)")
    args = parser.parse_args()
    if args.size % 8 or not 64 <= args.size <= 1024:
        parser.error("--size must be a multiple of 8 in 64..1024")
    if not 1 <= args.steps <= 50:
        parser.error("--steps must be 1..50")
    if not 1 <= args.batch <= BATCH_MAX or args.images < args.batch or args.images % args.batch:
        parser.error(f"--batch must be 1..{BATCH_MAX} and divide --images")
    if not 0 <= args.lora_steps <= 500:
        parser.error("--lora-steps must be 0..500")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads > 0:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from models.cache import ModelCache
    from models.manager import ModelManager
    from models.tiny import make_tiny

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="tollgate-bench-tune-"))
    kit = args.kit or work / "kit"
    renders: list[Render] = []
    training: tuple[float, float, int] | None = None
    try:
        start = time.perf_counter()
        make_tiny(kit)
        log(f"tiny kit ready in {time.perf_counter() - start:.1f} s at {kit}")
        mm = ModelManager(kit / "models.toml", cache=ModelCache(), device=args.device)
        shape = (args.images, args.batch, args.size, args.steps)
        renders.append(render(mm, "base", *shape, lora=None))
        if args.lora_steps:
            lora_dir = work / "lora"
            training = train(mm, lora_dir, args.lora_steps, args.size)
            log(f"LoRA: {training[0]:.2f} steps/s")
            renders.append(render(mm, "with LoRA", *shape, lora=lora_dir))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"tiny sd15, {args.images} images at {args.size}x{args.size}, {args.steps} steps; "
        f"device {mm.device}, torch threads {torch.get_num_threads()}"
    )
    b = args.batch
    print(
        f"{'render':<12}{f'{args.images // b} x {b} s':>12}{f'{args.images} x 1 s':>12}"
        f"{'speed-up':>10}{'img/s batched':>15}{'max px diff':>13}"
    )
    for r in renders:
        print(
            f"{r.label:<12}{r.batched_s:>12.2f}{r.single_s:>12.2f}{r.speedup:>9.2f}x"
            f"{r.images / r.batched_s:>15.1f}{r.max_diff:>13}"
        )
    if training is not None:
        rate, wall, steps = training
        print(
            f"LoRA training: {steps} steps at {args.size}px, {rate:.2f} steps/s in the loop; "
            f"train_lora call {wall:.1f} s (with loading and saving)"
        )


if __name__ == "__main__":
    main()
