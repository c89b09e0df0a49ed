"""Import shims for the 2022-era basicsr / realesrgan / gfpgan / facexlib stack.

basicsr 1.4.2 does ``from torchvision.transforms.functional_tensor import rgb_to_grayscale``;
torchvision >= 0.17 renamed that module to ``_functional_tensor``. Import
:func:`ensure_basicsr_compat` (or this module) before the first basicsr, realesrgan or
gfpgan import; the family modules do so.
"""

from __future__ import annotations

import importlib
import sys

_LEGACY = "torchvision.transforms.functional_tensor"


def ensure_basicsr_compat() -> None:
    """Alias ``torchvision.transforms.functional_tensor`` when torchvision lacks it."""
    if _LEGACY in sys.modules:
        return
    try:
        importlib.import_module(_LEGACY)
        return
    except ImportError:
        pass
    new = importlib.import_module("torchvision.transforms._functional_tensor")
    sys.modules[_LEGACY] = new


def set_offline_env() -> None:
    """Make Hugging Face libraries fail fast instead of reaching for the network."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DISABLE_TELEMETRY", "1")
