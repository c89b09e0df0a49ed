"""GFPGAN v1.4 face restoration: detect, align, restore, paste back (facexlib + gfpgan).

This runs GFPGANer's pipeline with two changes that matter in production:

* facexlib's RetinaFace + ParseNet weights load from the registry's ``facexlib_dir``
  (``detection_Resnet50_Final.pth``, ``parsing_parsenet.pth``). ``GFPGANer`` itself
  hard-codes ``model_rootpath='gfpgan/weights'`` relative to the current directory and
  downloads when a file is missing there; we build facexlib's ``FaceRestoreHelper``
  ourselves with ``model_rootpath=facexlib_dir`` after checking both files exist, so
  nothing is ever downloaded and the working directory does not matter.
* the number of faces per image is bounded (``max_faces``, highest detection scores
  first): a confused detector can report hundreds of faces.

No face -> :class:`~models.errors.NoFaceFound` ("no face found"). Optional Real-ESRGAN
background upsampler (an :class:`~models.esrgan.Upscaler`); without one the background
is resized with cv2 as in GFPGANer. RGBA input keeps its (resized) alpha.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.compat import ensure_basicsr_compat
from models.device import empty_device_cache, pick_device
from models.errors import (
    InvalidImage,
    InvalidRequest,
    ModelFileMissing,
    ModelLoadError,
    NoFaceFound,
)
from models.registry import FACEXLIB_FILES, GFPGANOptions, ModelEntry

if TYPE_CHECKING:
    from PIL import Image

    from models.esrgan import Upscaler

log = logging.getLogger(__name__)


@dataclass
class FaceResult:
    image: Image.Image
    faces_detected: int
    faces_restored: int


def build_gfpgan_arch(arch: str, channel_multiplier: int) -> Any:
    """The network GFPGANer builds for ``arch`` (out_size 512)."""
    ensure_basicsr_compat()
    common: dict[str, Any] = dict(
        out_size=512,
        num_style_feat=512,
        channel_multiplier=channel_multiplier,
        decoder_load_path=None,
        num_mlp=8,
        input_is_latent=True,
        different_w=True,
        narrow=1,
        sft_half=True,
    )
    if arch == "clean":
        from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

        return GFPGANv1Clean(fix_decoder=False, **common)
    if arch == "bilinear":
        from gfpgan.archs.gfpgan_bilinear_arch import GFPGANBilinear

        return GFPGANBilinear(fix_decoder=False, **common)
    if arch == "original":
        from gfpgan.archs.gfpganv1_arch import GFPGANv1

        return GFPGANv1(fix_decoder=True, **common)
    if arch == "RestoreFormer":
        from gfpgan.archs.restoreformer_arch import RestoreFormer

        return RestoreFormer()
    raise ModelLoadError(f"unknown GFPGAN arch {arch!r}")


class FaceEnhancer:
    """A loaded GFPGAN + facexlib pipeline (family ``gfpgan``)."""

    def __init__(
        self,
        path: str | Path,
        facexlib_dir: str | Path,
        options: GFPGANOptions | None = None,
        *,
        device: str | None = None,
        bg_upsampler: Upscaler | None = None,
        model_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.facexlib_dir = Path(facexlib_dir)
        self.options = options or GFPGANOptions()
        self.device = pick_device(device)
        self.bg_upsampler = bg_upsampler
        self.model_id = model_id or self.path.stem
        self.net: Any = None
        self.helper: Any = None  # facexlib FaceRestoreHelper
        self._lock = threading.Lock()

    @classmethod
    def from_entry(
        cls, entry: ModelEntry, *, device: str | None = None, bg_upsampler: Upscaler | None = None
    ) -> FaceEnhancer:
        assert isinstance(entry.options, GFPGANOptions) and entry.facexlib_dir is not None
        entry.check_files()
        return cls(
            entry.path,
            entry.facexlib_dir,
            entry.options,
            device=device,
            bg_upsampler=bg_upsampler,
            model_id=entry.id,
        )

    # ------------------------------------------------------------------ lifecycle
    def setup(self) -> None:
        if self.net is not None:
            return
        for p in [self.path] + [self.facexlib_dir / n for n in FACEXLIB_FILES]:
            if not p.is_file():
                raise ModelFileMissing(
                    p, "GFPGAN / facexlib weights (never downloaded at run time)"
                )
        ensure_basicsr_compat()
        import torch
        from facexlib.utils.face_restoration_helper import FaceRestoreHelper

        device = torch.device(self.device)
        o = self.options
        net = build_gfpgan_arch(o.arch, o.channel_multiplier)
        try:
            raw = torch.load(str(self.path), map_location="cpu", weights_only=True)
            key = "params_ema" if "params_ema" in raw else "params"
            net.load_state_dict(raw.get(key, raw), strict=True)
        except (RuntimeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"cannot load GFPGAN weights {self.path}: {exc}") from exc
        del raw
        net.eval()
        # Same helper GFPGANer builds, but with our model root: the files exist, so
        # facexlib's load_file_from_url returns the local path without downloading.
        helper = FaceRestoreHelper(
            o.upscale,
            face_size=512,
            crop_ratio=(1, 1),
            det_model="retinaface_resnet50",
            save_ext="png",
            use_parse=True,
            device=device,
            model_rootpath=str(self.facexlib_dir),
        )
        self.net = net.to(device)
        self.helper = helper

    def nbytes(self) -> int:
        from models.cache import module_nbytes

        if self.net is None:
            return 0
        return module_nbytes([self.net, self.helper.face_det, self.helper.face_parse])

    def unload(self) -> None:
        self.net = None
        self.helper = None
        empty_device_cache(self.device)

    # ------------------------------------------------------------------ run
    def _bound_faces(self, helper: Any, max_faces: int) -> None:
        n = len(helper.all_landmarks_5)
        if n <= max_faces:
            return
        dets = list(helper.det_faces)
        order = (
            sorted(range(n), key=lambda i: -float(dets[i][4])) if len(dets) == n else list(range(n))
        )
        keep = sorted(order[:max_faces])
        helper.all_landmarks_5 = [helper.all_landmarks_5[i] for i in keep]
        if len(dets) == n:
            helper.det_faces = [dets[i] for i in keep]

    def enhance_array(
        self,
        bgr: Any,
        *,
        weight: float | None = None,
        max_faces: int | None = None,
        bg_upsampler: Upscaler | None = None,
    ) -> tuple[Any, int, int]:
        """Restore faces in a BGR uint8 array. Returns (BGR array, detected, restored)."""
        import torch
        from basicsr.utils import img2tensor, tensor2img
        from torchvision.transforms.functional import normalize

        self.setup()
        o = self.options
        weight = o.weight if weight is None else weight
        max_faces = o.max_faces if max_faces is None else max_faces
        if max_faces < 1:
            raise InvalidRequest("max_faces must be >= 1")
        h, w = bgr.shape[:2]
        if h * w > o.max_input_pixels:
            raise InvalidRequest(f"input {w}x{h} exceeds {o.max_input_pixels} pixels")
        with self._lock, torch.inference_mode():
            helper = self.helper
            helper.clean_all()
            helper.read_image(bgr)
            helper.get_face_landmarks_5(
                only_center_face=o.only_center_face, eye_dist_threshold=o.eye_dist_threshold
            )
            detected = len(helper.all_landmarks_5)
            if detected == 0:
                helper.clean_all()
                raise NoFaceFound()
            self._bound_faces(helper, max_faces)
            helper.align_warp_face()
            restored = 0
            for cropped in helper.cropped_faces:
                t = img2tensor(cropped / 255.0, bgr2rgb=True, float32=True)
                normalize(t, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), inplace=True)
                t = t.unsqueeze(0).to(torch.device(self.device))
                try:
                    out = self.net(t, return_rgb=False, weight=weight)[0]
                    face = tensor2img(out.squeeze(0), rgb2bgr=True, min_max=(-1, 1))
                    restored += 1
                except RuntimeError as exc:  # as GFPGANer: keep the unrestored crop
                    log.warning("GFPGAN inference failed on one face: %s", exc)
                    face = cropped
                helper.add_restored_face(face.astype("uint8"))
            bg = None
            upsampler = bg_upsampler or self.bg_upsampler
            if upsampler is not None:
                import cv2

                bg, _ = upsampler.upscale_array(helper.input_img)
                target = (int(w * o.upscale), int(h * o.upscale))
                if (bg.shape[1], bg.shape[0]) != target:
                    bg = cv2.resize(bg, target, interpolation=cv2.INTER_LANCZOS4)
            helper.get_inverse_affine(None)
            result = helper.paste_faces_to_input_image(upsample_img=bg)
            helper.clean_all()
        return result, detected, restored

    def enhance(
        self,
        image: Image.Image,
        *,
        weight: float | None = None,
        max_faces: int | None = None,
        bg_upsampler: Upscaler | None = None,
    ) -> FaceResult:
        """Restore every detected face (up to ``max_faces``) and paste them back.

        The output is ``upscale`` times the input size. Raises :class:`NoFaceFound`.
        """
        import cv2
        import numpy as np
        from PIL import Image as PILImage

        if image.width < 1 or image.height < 1:
            raise InvalidImage("empty image")
        rgb = np.asarray(image.convert("RGB"))
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        out, detected, restored = self.enhance_array(
            bgr, weight=weight, max_faces=max_faces, bg_upsampler=bg_upsampler
        )
        result = PILImage.fromarray(cv2.cvtColor(out, cv2.COLOR_BGR2RGB), "RGB")
        if image.mode in ("RGBA", "LA"):
            alpha = image.getchannel("A").resize(result.size, resample=PILImage.Resampling.BICUBIC)
            result.putalpha(alpha)
        return FaceResult(result, detected, min(detected, restored))
