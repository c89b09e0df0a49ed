"""Tollgate model layer: registry, warm cache, one module per model family, tiny kit.

Importing this package is cheap (no torch); heavy libraries load on first use.

    from models import ModelManager
    mm = ModelManager("/srv/models/models.toml")       # or $TOLLGATE_MODELS
    mm.check_files()                                    # worker start-up
    res = mm.txt2img("sd15", "a lighthouse", seeds=[1, 2, 3])
"""

from models.cache import ModelCache, default_cache
from models.errors import (
    Canceled,
    InvalidImage,
    InvalidRequest,
    ModelConfigError,
    ModelError,
    ModelFileMissing,
    ModelLoadError,
    NoFaceFound,
    UnknownModel,
)
from models.manager import ModelManager, default_manager
from models.registry import ModelEntry, Registry, load_registry

__all__ = [
    "Canceled",
    "InvalidImage",
    "InvalidRequest",
    "ModelCache",
    "ModelConfigError",
    "ModelEntry",
    "ModelError",
    "ModelFileMissing",
    "ModelLoadError",
    "ModelManager",
    "NoFaceFound",
    "Registry",
    "UnknownModel",
    "default_cache",
    "default_manager",
    "load_registry",
]
