"""Errors raised by the model layer.

Everything the model layer raises on purpose derives from :class:`ModelError`, so a
worker can catch one class and turn it into a job failure with a readable message.
"""

from __future__ import annotations

from pathlib import Path


class ModelError(Exception):
    """Root of every error raised on purpose by :mod:`models`."""


class ModelConfigError(ModelError):
    """The registry (``models.toml``) is malformed or names an unknown model/family."""


class UnknownModel(ModelConfigError):
    """A model id that the registry does not define."""

    def __init__(self, model_id: str, known: list[str] | None = None) -> None:
        self.model_id = model_id
        self.known = sorted(known or [])
        hint = f" (known: {', '.join(self.known)})" if self.known else ""
        super().__init__(f"unknown model id {model_id!r}{hint}")


class ModelFileMissing(ModelError):
    """A weight/config file the registry points at is not on disk.

    Nothing is ever downloaded at run time: the fix is always to put the file at
    ``path``. ``hint`` says what the file is and where it comes from.
    """

    def __init__(self, path: str | Path, hint: str = "") -> None:
        self.path = Path(path)
        self.hint = hint
        msg = f"model file missing: {self.path}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class ModelLoadError(ModelError):
    """The file is there but the library could not load it (wrong format/arch)."""


class InvalidImage(ModelError):
    """An input image cannot be processed (unreadable, wrong mode, too large, ...)."""


class InvalidRequest(ModelError):
    """Job parameters that the model cannot honour (bad size, too many images, ...)."""


class NoFaceFound(ModelError):
    """Face enhancement found no face in the image."""

    def __init__(self, message: str = "no face found") -> None:
        super().__init__(message)


class Canceled(ModelError):
    """A run was stopped because its progress callback asked to stop.

    ``step`` is the number of steps that completed, ``total`` the number requested.
    """

    def __init__(self, step: int, total: int, what: str = "run") -> None:
        self.step = step
        self.total = total
        super().__init__(f"{what} canceled after {step}/{total} steps")
