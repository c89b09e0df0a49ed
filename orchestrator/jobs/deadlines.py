"""How long a job may take before the reaper expires it (pure).

deadline = queue allowance + work / throughput, where work is pixels x steps x images for
diffusion and pixels x scale^2 for post-processing. Deliberately generous: expiring a job
that would have finished wastes GPU time, but a job that never ends holds credits forever.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

QUEUE_ALLOWANCE_S: Final = 900
# Conservative pixel-steps per second of a slow GPU at 512x512 (about 1 it/s).
PIXEL_STEPS_PER_S: Final = 262_144
POST_PIXELS_PER_S: Final = 2_000_000
TUNE_TRAIN_S: Final = 7200
HOLD_GRACE_S: Final = 3600


def work_s(spec: Mapping[str, Any]) -> int:
    job_type = spec.get("type")
    if job_type in ("txt2img", "tune_prompt"):
        pixel_steps = spec["width"] * spec["height"] * spec["steps"] * spec["num_images"]
        return -(-pixel_steps // PIXEL_STEPS_PER_S)
    if job_type == "tune":
        return TUNE_TRAIN_S
    scale = spec.get("scale", 4) if job_type == "upscale" else 2
    return 60 + -(-(1024 * 1024 * scale * scale) // POST_PIXELS_PER_S)


def deadline_s(spec: Mapping[str, Any]) -> int:
    return QUEUE_ALLOWANCE_S + work_s(spec)


def hold_ttl_s(spec: Mapping[str, Any]) -> int:
    """The ledger hold outlives the job's deadline: the reaper, not the hold sweeper, ends it."""
    return deadline_s(spec) + HOLD_GRACE_S
