from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import ModelFileMissing, NoFaceFound
from models.gfpgan import FaceEnhancer


def _astronaut(size: int = 256) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BOX)


def test_face_enhance_full_pipeline(
    models_manager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # GFPGANer would look in ./gfpgan/weights; we must not
    src = _astronaut()
    res = models_manager.face_enhance("gfpgan-1.4", src)
    assert res.faces_detected >= 1 and res.faces_restored == 1  # bounded by max_faces = 1
    assert res.image.size == (512, 512) and res.image.mode == "RGB"
    out = np.asarray(res.image, dtype=np.int16)
    base = np.asarray(src.resize((512, 512), Image.Resampling.LANCZOS), dtype=np.int16)
    # the (random) restored face was pasted back around the face; far corners untouched
    face = np.abs(out[100:300, 150:330] - base[100:300, 150:330]).mean()
    corner = np.abs(out[450:, :60] - base[450:, :60]).mean()
    assert face > corner + 5
    assert os.listdir(tmp_path) == []  # nothing downloaded / written into cwd


def test_no_face_raises(models_manager) -> None:
    with pytest.raises(NoFaceFound, match="no face found"):
        models_manager.face_enhance("gfpgan-1.4", Image.new("RGB", (256, 256), (128, 128, 128)))
    assert models_manager.load_count("gfpgan-1.4") == 1


def test_missing_facexlib_weights_is_clear(models_registry, tmp_path: Path) -> None:
    entry = models_registry.get("gfpgan-1.4")
    (tmp_path / "detection_Resnet50_Final.pth").symlink_to(
        entry.facexlib_dir / "detection_Resnet50_Final.pth"
    )
    enh = FaceEnhancer(entry.path, tmp_path, entry.options, device="cpu")
    with pytest.raises(ModelFileMissing) as ei:
        enh.setup()
    assert ei.value.path == tmp_path / "parsing_parsenet.pth"


def test_background_upsampler(models_manager) -> None:
    enhancer = models_manager.face_enhancer("gfpgan-1.4")
    bg = models_manager.upscaler("realesrgan-x2plus")
    src = _astronaut()
    res = enhancer.enhance(src, bg_upsampler=bg)
    assert res.image.size == (512, 512) and res.faces_restored == 1
    plain = np.asarray(src.resize((512, 512), Image.Resampling.LANCZOS), dtype=np.int16)
    corner = np.abs(np.asarray(res.image, dtype=np.int16)[450:, :60] - plain[450:, :60]).mean()
    assert corner > 5  # the (random) Real-ESRGAN background, not a plain resize
