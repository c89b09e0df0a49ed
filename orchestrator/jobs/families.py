"""Job families: which Celery task and queue run each job type, and its time limits.

Time limits bound every job (soft: the task is told to stop; hard: the process is killed).
The broker's visibility timeout must exceed the longest hard limit, or Redis would redeliver
a task that is still running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Family:
    task_name: str
    queue: str
    soft_time_limit_s: int
    time_limit_s: int


FAMILIES: Final[dict[str, Family]] = {
    "txt2img": Family("tollgate.txt2img", "gpu.txt2img", 600, 660),
    "upscale": Family("tollgate.upscale", "gpu.post", 300, 330),
    "face_enhance": Family("tollgate.face_enhance", "gpu.post", 300, 330),
    "remove_background": Family("tollgate.remove_background", "gpu.post", 300, 330),
    "tune": Family("tollgate.tune", "gpu.train", 7200, 7500),
    # A tune's 64-image render runs where the SD pipelines are warm.
    "tune_render": Family("tollgate.tune_render", "gpu.txt2img", 1800, 1900),
    "tune_prompt": Family("tollgate.tune_prompt", "gpu.txt2img", 600, 660),
}
CALLBACK_TASK: Final = "tollgate.callback"
CALLBACK_QUEUE: Final = "tollgate.callbacks"
MAINTENANCE_QUEUE: Final = "tollgate.maintenance"
GPU_QUEUES: Final = ("gpu.txt2img", "gpu.post", "gpu.train")
LONGEST_JOB_S: Final = max(f.time_limit_s for f in FAMILIES.values())
VISIBILITY_TIMEOUT_S: Final = LONGEST_JOB_S + 3600


def family_for(job_type: str) -> Family:
    return FAMILIES[job_type]
