"""Tiny model kit: small, seeded, randomly initialised models in the real file formats.

``make_tiny(dir)`` writes, in about 10-20 s on two CPU cores:

* ``sd15/``  a diffusers Stable Diffusion 1.x folder (tiny UNet2DConditionModel with
  block_out_channels (32, 64), a 4-level AutoencoderKL so vae_scale_factor is 8, a tiny
  CLIPTextModel, a CLIPTokenizer built from a local byte-level vocab.json/merges.txt,
  DPMSolverMultistepScheduler with steps_offset=1, no safety checker);
* ``sdxl/``  the same for SDXL (two text encoders, text_time conditioning);
* ``RealESRGAN_x4plus.pth`` / ``RealESRGAN_x2plus.pth`` (tiny RRDBNet) and
  ``realesr-general-x4v3.pth`` (tiny SRVGGNetCompact), saved as ``{"params_ema": sd}``;
* ``GFPGANv1.4.pth``: GFPGANv1Clean at the real v1.4 size (GFPGANer only builds that),
  random weights, ~350 MB;
* ``facexlib/detection_Resnet50_Final.pth`` and ``facexlib/parsing_parsenet.pth``;
* ``rembg/models/u2net/u2net.onnx``: a U2Net-shaped ONNX graph (input 1x3x320x320,
  seven sigmoid 1x1x320x320 outputs), in rembg's own layout;
* ``models.toml``: a registry with ids ``sd15``, ``sdxl``, ``realesrgan-x4plus``,
  ``realesrgan-x2plus``, ``realesr-general-x4v3``, ``gfpgan-1.4``, ``u2net``.

The ParseNet face parser is random except for its mask head, which labels every pixel
"skin" so the paste-back mask covers the aligned face crop. The RetinaFace detector is
random except for its heads, which are set so that detection
is deterministic and meaningful for tests: box and landmark heads output the anchor box
and a canonical 5-point face layout, and the classification head fires only on the
stride-16 / 128 px anchors along one direction of the (random) feature space, calibrated
at build time so that flat images score far below facexlib's 0.97 threshold and the
astronaut photo from scikit-image scores above it. A random detector would otherwise
report hundreds of "faces" everywhere, which makes "no face" impossible to test.

Random weights produce noise images: the kit exercises code paths and file formats,
not quality. Building is deterministic (same seed, same bytes) and idempotent: if
``DIR/models.toml`` exists with the current :data:`KIT_VERSION`, nothing is rebuilt.
"""

from __future__ import annotations

from models.tiny.diffusion import build_sd15, build_sdxl
from models.tiny.faces import build_facexlib
from models.tiny.helpers import write_clip_vocab
from models.tiny.kit import DEFAULT_SEED, KIT_VERSION, kit_is_current, make_tiny
from models.tiny.restorers import build_esrgan, build_gfpgan
from models.tiny.u2net import build_u2net_onnx

__all__ = [
    "DEFAULT_SEED",
    "KIT_VERSION",
    "build_esrgan",
    "build_facexlib",
    "build_gfpgan",
    "build_sd15",
    "build_sdxl",
    "build_u2net_onnx",
    "kit_is_current",
    "make_tiny",
    "write_clip_vocab",
]
