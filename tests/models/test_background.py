from __future__ import annotations

import io

import numpy as np
from PIL import Image

from models.background import to_png_bytes


def _photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((160, 160))


def test_remove_background_rgba_with_varying_alpha(models_manager) -> None:
    out = models_manager.remove_background("u2net", _photo())
    assert out.mode == "RGBA" and out.size == (160, 160)
    alpha = np.asarray(out)[..., 3]
    assert alpha.std() > 1.0 and alpha.min() < alpha.max()
    png = to_png_bytes(out)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(png)).mode == "RGBA"


def test_alpha_matting_and_session_created_once(models_manager) -> None:
    out = models_manager.remove_background("u2net", _photo().convert("L"), alpha_matting=True)
    assert out.mode == "RGBA"
    models_manager.remove_background("u2net", _photo())
    assert models_manager.load_count("u2net") == 1


def test_model_outside_rembg_home_loads(models_registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from models.background import BackgroundRemover

    copy = tmp_path / "elsewhere" / "my-u2net.onnx"
    copy.parent.mkdir()
    shutil.copy(models_registry.get("u2net").path, copy)
    out = BackgroundRemover(copy, device="cpu").remove(_photo())
    assert out.mode == "RGBA"
