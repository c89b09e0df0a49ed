"""The kit itself: ``make_tiny`` runs every builder with its own seed offset into one
folder and then writes ``models.toml`` (from ``REGISTRY_TEMPLATE``, with the SDXL and
GFPGAN entries optional) last, stamped with :data:`KIT_VERSION`; ``kit_is_current`` reads
that stamp so an existing, complete kit is not rebuilt.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

from models.compat import set_offline_env
from models.tiny.diffusion import build_sd15, build_sdxl
from models.tiny.faces import build_facexlib
from models.tiny.restorers import build_esrgan, build_gfpgan
from models.tiny.u2net import build_u2net_onnx

log = logging.getLogger(__name__)

KIT_VERSION = "tiny-2"
DEFAULT_SEED = 1234


REGISTRY_TEMPLATE = """\
# Tiny model kit ({kit}): random weights in real formats. Made by `tollgate models make-tiny`.
version = 1
kit_version = "{kit}"
seed = {seed}

[models.sd15]
family = "sd15"
path = "sd15"
description = "tiny Stable Diffusion 1.x (random weights)"
[models.sd15.defaults]
steps = 4
guidance = 7.5
width = 64
height = 64
{sdxl}
[models.realesrgan-x4plus]
family = "esrgan"
path = "RealESRGAN_x4plus.pth"
description = "tiny RRDBNet x4"
[models.realesrgan-x4plus.defaults]
scale = 4
tile = 128

[models.realesrgan-x2plus]
family = "esrgan"
path = "RealESRGAN_x2plus.pth"
description = "tiny RRDBNet x2"
[models.realesrgan-x2plus.defaults]
scale = 2
tile = 128

[models.realesr-general-x4v3]
family = "esrgan"
path = "realesr-general-x4v3.pth"
description = "tiny SRVGGNetCompact x4"
[models.realesr-general-x4v3.defaults]
scale = 4
tile = 128
alpha_upsampler = "resize"

[models."gfpgan-1.4"]
family = "gfpgan"
path = "GFPGANv1.4.pth"
facexlib_dir = "facexlib"
description = "GFPGANv1Clean at v1.4 size, random weights; calibrated tiny RetinaFace"
[models."gfpgan-1.4".defaults]
upscale = 2
max_faces = 1

[models.u2net]
family = "rembg"
path = "rembg/models/u2net/u2net.onnx"
description = "U2Net-shaped ONNX (random weights)"
"""

SDXL_BLOCK = """
[models.sdxl]
family = "sdxl"
path = "sdxl"
description = "tiny SDXL (random weights)"
[models.sdxl.defaults]
steps = 4
guidance = 5.0
width = 64
height = 64
"""


def kit_is_current(folder: Path) -> bool:
    toml = folder / "models.toml"
    if not toml.is_file():
        return False
    try:
        data = tomllib.loads(toml.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return data.get("kit_version") == KIT_VERSION


def make_tiny(
    folder: str | Path,
    *,
    seed: int = DEFAULT_SEED,
    sdxl: bool = True,
    gfpgan: bool = True,
    force: bool = False,
) -> Path:
    """Build the tiny kit into ``folder`` and return the path of ``folder/models.toml``.

    Skips all work when ``models.toml`` already carries the current kit version (unless
    ``force``). ``models.toml`` is written last, so an interrupted build is redone.
    ``gfpgan=False`` skips the ~550 MB of GFPGAN/facexlib weights (their registry entry
    is then omitted).
    """
    set_offline_env()
    out = Path(folder).expanduser().resolve()
    toml = out / "models.toml"
    if not force and kit_is_current(out):
        log.info("tiny kit already present in %s", out)
        return toml
    out.mkdir(parents=True, exist_ok=True)
    if toml.exists():
        toml.unlink()

    import torch

    threads = torch.get_num_threads()
    try:
        for sub in ("sd15", "sdxl", "facexlib", "rembg"):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
        steps: list[tuple[str, Any]] = [("sd15", lambda: build_sd15(out / "sd15", seed))]
        if sdxl:
            steps.append(("sdxl", lambda: build_sdxl(out / "sdxl", seed + 100)))
        steps.append(("esrgan", lambda: build_esrgan(out, seed + 200)))
        if gfpgan:
            steps.append(("gfpgan", lambda: build_gfpgan(out, seed + 300)))
            steps.append(("facexlib", lambda: build_facexlib(out / "facexlib", seed + 400)))
        u2 = out / "rembg" / "models" / "u2net" / "u2net.onnx"
        steps.append(("u2net", lambda: build_u2net_onnx(u2, seed + 500)))
        for name, fn in steps:
            t0 = time.perf_counter()
            fn()
            log.info("tiny kit: %s built in %.1f s", name, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)

    text = REGISTRY_TEMPLATE.format(kit=KIT_VERSION, seed=seed, sdxl=SDXL_BLOCK if sdxl else "")
    if not gfpgan:
        head = '[models."gfpgan-1.4"]'
        start = text.index(head)
        end = text.index("[models.u2net]")
        text = text[:start] + text[end:]
    tmp = toml.with_suffix(".toml.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, toml)
    return toml
