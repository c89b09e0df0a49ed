"""Real-ESRGAN upscaling (x2 / x4) from a local ``.pth`` through realesrgan's RealESRGANer.

Supported files: RealESRGAN_x4plus / RealESRGAN_x2plus (RRDBNet) and
realesr-general-x4v3 (SRVGGNetCompact), as ``{"params_ema": state_dict}`` or
``{"params": state_dict}``. The network and its sizes are inferred from the state dict
(``arch = "auto"``), so the same code loads real and tiny weights.

Large inputs are processed in tiles (``tile`` option, input pixels per tile edge);
RGBA input keeps its alpha channel (RGBA out); output size is exactly ``scale`` times
the input.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.compat import ensure_basicsr_compat
from models.device import empty_device_cache, is_cuda, pick_device
from models.errors import InvalidImage, InvalidRequest, ModelFileMissing, ModelLoadError
from models.registry import ESRGANOptions, ModelEntry

try:  # Pillow is always present with this stack; keep the import cheap for typing.
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None  # type: ignore[assignment]


@dataclass(frozen=True)
class ArchSpec:
    """Network description inferred from a state dict."""

    arch: str  # "RRDBNet" | "SRVGGNetCompact"
    scale: int
    num_in_ch: int
    num_out_ch: int
    num_feat: int
    num_block: int = 0  # RRDBNet
    num_grow_ch: int = 32  # RRDBNet
    num_conv: int = 0  # SRVGGNetCompact
    act_type: str = "prelu"  # SRVGGNetCompact

    def build(self) -> Any:
        ensure_basicsr_compat()
        if self.arch == "RRDBNet":
            from basicsr.archs.rrdbnet_arch import RRDBNet

            return RRDBNet(
                num_in_ch=self.num_in_ch,
                num_out_ch=self.num_out_ch,
                num_feat=self.num_feat,
                num_block=self.num_block,
                num_grow_ch=self.num_grow_ch,
                scale=self.scale,
            )
        from realesrgan.archs.srvgg_arch import SRVGGNetCompact

        return SRVGGNetCompact(
            num_in_ch=self.num_in_ch,
            num_out_ch=self.num_out_ch,
            num_feat=self.num_feat,
            num_conv=self.num_conv,
            upscale=self.scale,
            act_type=self.act_type,
        )


def _state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if isinstance(raw, dict):
        for key in ("params_ema", "params"):
            if key in raw and isinstance(raw[key], dict):
                return raw[key]  # type: ignore[no-any-return]
        return raw
    raise ModelLoadError(f"{path} does not hold a state dict")


def infer_arch(sd: dict[str, Any]) -> ArchSpec:
    """Infer RRDBNet / SRVGGNetCompact and their hyper-parameters from a state dict."""
    if "conv_first.weight" in sd:
        first = sd["conv_first.weight"]
        in_ch = int(first.shape[1])
        # RRDBNet pixel-unshuffles x2 / x1 inputs: 3 channels -> 12 (x2) or 48 (x1).
        scale = {3: 4, 12: 2, 48: 1}.get(in_ch)
        if scale is None:
            raise ModelLoadError(f"unsupported RRDBNet input channels {in_ch}")
        blocks = {int(k.split(".")[1]) for k in sd if k.startswith("body.") and ".rdb1." in k}
        return ArchSpec(
            arch="RRDBNet",
            scale=scale,
            num_in_ch=in_ch // (4 if scale == 2 else 16 if scale == 1 else 1),
            num_out_ch=int(sd["conv_last.weight"].shape[0]),
            num_feat=int(first.shape[0]),
            num_block=len(blocks),
            num_grow_ch=int(sd["body.0.rdb1.conv1.weight"].shape[0]),
        )
    if "body.0.weight" in sd:
        convs = sorted(
            (
                int(k.split(".")[1])
                for k, v in sd.items()
                if k.startswith("body.") and k.endswith(".weight") and v.ndim == 4
            ),
        )
        first = sd["body.0.weight"]
        last = sd[f"body.{convs[-1]}.weight"]
        in_ch = int(first.shape[1])
        out_total = int(last.shape[0])
        num_out = in_ch
        scale = int(round(math.sqrt(out_total / num_out)))
        act = "prelu" if "body.1.weight" in sd else "leakyrelu"
        return ArchSpec(
            arch="SRVGGNetCompact",
            scale=scale,
            num_in_ch=in_ch,
            num_out_ch=num_out,
            num_feat=int(first.shape[0]),
            num_conv=len(convs) - 2,
            act_type=act,
        )
    raise ModelLoadError("state dict is neither RRDBNet nor SRVGGNetCompact")


def _to_bgr_array(image: Image.Image) -> Any:
    import cv2
    import numpy as np

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        arr = np.asarray(image.convert("RGBA"))
        return cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
    arr = np.asarray(image.convert("RGB"))
    return cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)


def _from_bgr_array(arr: Any, mode: str) -> Image.Image:
    import cv2
    from PIL import Image as PILImage

    if mode == "RGBA":
        return PILImage.fromarray(cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA), "RGBA")
    return PILImage.fromarray(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB), "RGB")


class Upscaler:
    """A loaded Real-ESRGAN model (family ``esrgan``)."""

    def __init__(
        self,
        path: str | Path,
        options: ESRGANOptions | None = None,
        *,
        device: str | None = None,
        model_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.options = options or ESRGANOptions()
        self.device = pick_device(device)
        self.model_id = model_id or self.path.stem
        self.spec: ArchSpec | None = None
        self.upsampler: Any = None  # realesrgan.RealESRGANer
        self._lock = threading.Lock()

    @classmethod
    def from_entry(cls, entry: ModelEntry, *, device: str | None = None) -> Upscaler:
        assert isinstance(entry.options, ESRGANOptions)
        entry.check_files()
        return cls(entry.path, entry.options, device=device, model_id=entry.id)

    @property
    def scale(self) -> int:
        return self.spec.scale if self.spec else self.options.scale

    def setup(self) -> None:
        if self.upsampler is not None:
            return
        if not self.path.is_file():
            raise ModelFileMissing(self.path, "Real-ESRGAN weights")
        ensure_basicsr_compat()
        import torch
        from realesrgan import RealESRGANer

        spec = infer_arch(_state_dict(self.path))
        o = self.options
        if o.arch != "auto" and o.arch != spec.arch:
            raise ModelLoadError(f"{self.path} holds a {spec.arch}, registry says {o.arch}")
        if spec.scale != o.scale:
            raise ModelLoadError(
                f"{self.path} is a x{spec.scale} model, registry says scale {o.scale}"
            )
        half = is_cuda(self.device) if o.half is None else o.half
        try:
            self.upsampler = RealESRGANer(
                scale=spec.scale,
                model_path=str(self.path),
                model=spec.build(),
                tile=o.tile,
                tile_pad=o.tile_pad,
                pre_pad=o.pre_pad,
                half=half,
                device=torch.device(self.device),
            )
        except RuntimeError as exc:  # load_state_dict mismatch
            raise ModelLoadError(f"cannot load {self.path}: {exc}") from exc
        self.spec = spec

    def nbytes(self) -> int:
        from models.cache import module_nbytes

        return module_nbytes([self.upsampler.model]) if self.upsampler is not None else 0

    def unload(self) -> None:
        self.upsampler = None
        empty_device_cache(self.device)

    def upscale_array(self, img: Any, *, tile: int | None = None) -> tuple[Any, str]:
        """Upscale a BGR/BGRA/gray uint8 array; returns (array, mode) like RealESRGANer."""
        import torch

        self.setup()
        h, w = img.shape[:2]
        if h * w > self.options.max_input_pixels:
            raise InvalidRequest(f"input {w}x{h} exceeds {self.options.max_input_pixels} pixels")
        with self._lock, torch.inference_mode():
            up = self.upsampler
            up.tile_size = self.options.tile if tile is None else tile
            try:
                # RealESRGANer prints "Tile i/n" to stdout; keep worker logs clean.
                with contextlib.redirect_stdout(io.StringIO()):
                    out, mode = up.enhance(
                        img, outscale=self.scale, alpha_upsampler=self.options.alpha_upsampler
                    )
            finally:
                up.tile_size = self.options.tile
                up.img = up.output = None  # drop per-call tensors kept on the helper
        return out, mode

    def upscale(self, image: Image.Image, *, tile: int | None = None) -> Image.Image:
        """Upscale a PIL image by the model's scale. RGBA in -> RGBA out."""
        if image.width < 1 or image.height < 1:
            raise InvalidImage("empty image")
        arr = _to_bgr_array(image)
        out, mode = self.upscale_array(arr, tile=tile)
        result = _from_bgr_array(out, "RGBA" if mode == "RGBA" else "RGB")
        expected = (image.width * self.scale, image.height * self.scale)
        if result.size != expected:
            result = result.resize(expected, resample=3)
        return result
