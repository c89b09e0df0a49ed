"""Background removal with rembg, from a local ONNX file.

The session is created once per model (per worker process) with rembg's own
``*_custom`` session classes, which never download: ``u2net_custom`` (u2net, u2netp,
u2net_human_seg, silueta files), ``dis_custom`` (isnet-*), ``ben_custom``. rembg 2.0.86
only accepts a ``model_path`` inside its models home (``$U2NET_HOME``, else
``$REMBG_HOME`` / ``~/.rembg``); we point ``U2NET_HOME`` at the file's own folder while
the session is created (under a lock, then restore it), so any local path works. The
stock layout ``<home>/models/u2net/u2net.onnx`` is what the tiny kit writes.

Output is an RGBA image (see :func:`to_png_bytes` for PNG bytes); alpha matting is
optional (``alpha_matting`` option or per call).
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

from models.device import is_cuda, pick_device
from models.errors import InvalidImage, InvalidRequest, ModelFileMissing, ModelLoadError
from models.registry import ModelEntry, RembgOptions

try:
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None  # type: ignore[assignment]

_SESSION_FOR_ARCH = {"u2net": "u2net_custom", "dis": "dis_custom", "ben": "ben_custom"}
_env_lock = threading.Lock()


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if is_cuda(device) and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class BackgroundRemover:
    """A loaded rembg session (family ``rembg``)."""

    def __init__(
        self,
        path: str | Path,
        options: RembgOptions | None = None,
        *,
        device: str | None = None,
        model_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.options = options or RembgOptions()
        self.device = pick_device(device)
        self.model_id = model_id or self.path.stem
        self.session: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_entry(cls, entry: ModelEntry, *, device: str | None = None) -> BackgroundRemover:
        assert isinstance(entry.options, RembgOptions)
        entry.check_files()
        return cls(entry.path, entry.options, device=device, model_id=entry.id)

    def setup(self) -> None:
        if self.session is not None:
            return
        if not self.path.is_file():
            raise ModelFileMissing(self.path, "rembg ONNX model")
        from rembg import new_session

        model_path = str(self.path.resolve())
        name = _SESSION_FOR_ARCH[self.options.arch]
        with _env_lock:
            saved = os.environ.get("U2NET_HOME")
            os.environ["U2NET_HOME"] = str(Path(model_path).parent)
            try:
                self.session = new_session(
                    name, model_path=model_path, providers=_providers(self.device)
                )
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ModelLoadError(
                    f"cannot create rembg session from {model_path}: {exc}"
                ) from exc
            finally:
                if saved is None:
                    os.environ.pop("U2NET_HOME", None)
                else:
                    os.environ["U2NET_HOME"] = saved

    def nbytes(self) -> int:
        return self.path.stat().st_size if self.session is not None and self.path.exists() else 0

    def unload(self) -> None:
        self.session = None

    def remove(
        self,
        image: Image.Image,
        *,
        alpha_matting: bool | None = None,
        post_process_mask: bool | None = None,
    ) -> Image.Image:
        """Return ``image`` as RGBA with the background made transparent."""
        from rembg import remove

        if image.width < 1 or image.height < 1:
            raise InvalidImage("empty image")
        o = self.options
        if image.width * image.height > o.max_input_pixels:
            raise InvalidRequest(
                f"input {image.width}x{image.height} exceeds {o.max_input_pixels} pixels"
            )
        self.setup()
        src = image.convert("RGB") if image.mode not in ("RGB", "RGBA") else image
        with self._lock:
            out = remove(
                src,
                session=self.session,
                alpha_matting=o.alpha_matting if alpha_matting is None else alpha_matting,
                alpha_matting_foreground_threshold=o.alpha_matting_foreground_threshold,
                alpha_matting_background_threshold=o.alpha_matting_background_threshold,
                alpha_matting_erode_size=o.alpha_matting_erode_size,
                post_process_mask=o.post_process_mask
                if post_process_mask is None
                else post_process_mask,
            )
        if not isinstance(out, Image.Image):  # pragma: no cover - rembg returns PIL for PIL input
            raise ModelLoadError("rembg returned an unexpected type")
        return out.convert("RGBA") if out.mode != "RGBA" else out


def to_png_bytes(image: Image.Image) -> bytes:
    """Encode an image (RGBA keeps its alpha) as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
