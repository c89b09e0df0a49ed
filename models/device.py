"""Device and dtype selection.

``TOLLGATE_DEVICE`` overrides the automatic choice (``cuda``, ``cuda:1``, ``cpu``).
fp16 on CUDA, fp32 on CPU (half precision is slow or unsupported on CPU).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from models.errors import ModelConfigError

if TYPE_CHECKING:
    import torch

ENV_DEVICE = "TOLLGATE_DEVICE"


def pick_device(override: str | None = None) -> str:
    """Return the device string to run models on.

    Order: explicit ``override``, then ``$TOLLGATE_DEVICE``, then ``cuda`` when
    available, else ``cpu``. Asking for CUDA on a machine without it is an error,
    not a silent CPU fallback.
    """
    import torch

    wanted = override or os.environ.get(ENV_DEVICE) or ""
    wanted = wanted.strip().lower()
    if not wanted or wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelConfigError(f"device {wanted!r} requested but CUDA is not available")
        return wanted
    if wanted == "cpu":
        return "cpu"
    raise ModelConfigError(f"unsupported device {wanted!r} (use cpu, cuda or cuda:N)")


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def dtype_for(device: str) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere."""
    import torch

    return torch.float16 if is_cuda(device) else torch.float32


def empty_device_cache(device: str) -> None:
    """Release cached allocator blocks after a model is evicted."""
    if is_cuda(device):
        import torch

        torch.cuda.empty_cache()
