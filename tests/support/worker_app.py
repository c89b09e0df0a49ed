"""A Celery worker for tests: the product's app and tasks, with scripted runners."""

from __future__ import annotations

import workers.face_enhance
import workers.remove_background
import workers.txt2img
import workers.upscale  # noqa: F401  (import the product tasks before overriding runners)
from tests.support.behaviours import scripted
from workers.app import app
from workers.runtime import register

for job_type in ("txt2img", "upscale", "face_enhance", "remove_background"):
    register(job_type, lambda: scripted)

__all__ = ["app"]
