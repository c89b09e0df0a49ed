from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.errors import ModelFileMissing, ModelLoadError
from models.esrgan import Upscaler, infer_arch
from models.registry import ESRGANOptions


def _noise(w: int, h: int, mode: str = "RGB") -> Image.Image:
    ch = 4 if mode == "RGBA" else 3
    arr = np.random.default_rng(0).integers(0, 255, (h, w, ch), dtype=np.uint8)
    return Image.fromarray(arr, mode)


@pytest.mark.parametrize(
    ("model_id", "scale"),
    [("realesrgan-x4plus", 4), ("realesrgan-x2plus", 2), ("realesr-general-x4v3", 4)],
)
def test_exact_output_dims(models_manager, model_id: str, scale: int) -> None:
    out = models_manager.upscale(model_id, _noise(37, 23))
    assert out.size == (37 * scale, 23 * scale) and out.mode == "RGB"


def test_rgba_keeps_alpha(models_manager) -> None:
    arr = np.zeros((24, 40, 4), dtype=np.uint8)
    arr[..., :3] = 90
    arr[:, 20:, 3] = 255  # left half transparent, right half opaque
    out = models_manager.upscale("realesr-general-x4v3", Image.fromarray(arr, "RGBA"))
    assert out.mode == "RGBA" and out.size == (160, 96)
    alpha = np.asarray(out)[..., 3]
    assert alpha[:, :70].max() < 10 and alpha[:, 90:].min() > 245
    # the x4plus entry upsamples alpha with the network itself (library default)
    out2 = models_manager.upscale("realesrgan-x4plus", Image.fromarray(arr, "RGBA"))
    assert out2.mode == "RGBA" and out2.size == (160, 96)


def test_tiled_matches_dims_and_loads_once(models_manager) -> None:
    img = _noise(150, 70)
    tiled = models_manager.upscale("realesrgan-x2plus", img, tile=32)
    whole = models_manager.upscale("realesrgan-x2plus", img, tile=0)
    assert tiled.size == whole.size == (300, 140)
    diff = np.abs(np.asarray(tiled, dtype=np.int16) - np.asarray(whole, dtype=np.int16))
    assert diff.mean() < 8  # tiles with padding closely match the single pass
    assert models_manager.load_count("realesrgan-x2plus") == 1


def test_arch_is_inferred_from_state_dict(models_registry) -> None:
    import torch

    sd = torch.load(models_registry.get("realesr-general-x4v3").path, weights_only=True)[
        "params_ema"
    ]
    spec = infer_arch(sd)
    assert spec.arch == "SRVGGNetCompact" and spec.scale == 4
    sd2 = torch.load(models_registry.get("realesrgan-x2plus").path, weights_only=True)["params_ema"]
    assert infer_arch(sd2).arch == "RRDBNet" and infer_arch(sd2).scale == 2


def test_scale_mismatch_and_missing_file(models_registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = models_registry.get("realesrgan-x2plus").path
    with pytest.raises(ModelLoadError, match="x2"):
        Upscaler(path, ESRGANOptions(scale=4), device="cpu").setup()
    with pytest.raises(ModelFileMissing):
        Upscaler(tmp_path / "RealESRGAN_x4plus.pth", device="cpu").setup()


def test_manager_reports_missing_file_without_loading(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from models.cache import ModelCache
    from models.manager import ModelManager
    from models.registry import load_registry

    toml = tmp_path / "models.toml"
    toml.write_text('version = 1\n[models.up]\nfamily = "esrgan"\npath = "RealESRGAN_x4plus.pth"\n')
    mm = ModelManager(load_registry(toml, check_files=False), cache=ModelCache(10**9), device="cpu")
    with pytest.raises(ModelFileMissing) as ei:
        mm.upscale("up", _noise(8, 8))
    assert ei.value.path == tmp_path / "RealESRGAN_x4plus.pth"
    assert mm.load_count("up") == 0
