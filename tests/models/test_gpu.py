"""GPU tests (marked `gpu`): real-size architectures (models/fullsize.py, random seeded
weights) in fp16 on CUDA, through the product's registry, ModelManager and model classes.
Without a CUDA device every test here skips; on a GPU node: `pytest -m gpu`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.cache import ModelCache
from models.fullsize import build_esrgan_x4_full, build_sd15_full, registry_toml
from models.manager import ModelManager
from models.registry import Registry, load_registry

pytestmark = pytest.mark.gpu

GPU_CACHE_BYTES = 24 * 1024**3


@pytest.fixture(scope="module")
def torch() -> Any:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


@pytest.fixture(scope="module")
def full_registry(torch: Any, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    out = tmp_path_factory.mktemp("fullsize")
    sd15 = build_sd15_full(out / "sd15-full", seed=11)
    x4 = build_esrgan_x4_full(out / "RealESRGAN_x4plus.pth", seed=12)
    (out / "models.toml").write_text(registry_toml(sd15=sd15, esrgan_x4=x4))
    return load_registry(out / "models.toml")


@pytest.fixture(scope="module")
def gpu(full_registry: Registry) -> ModelManager:
    return ModelManager(full_registry, cache=ModelCache(GPU_CACHE_BYTES), device="cuda")


def test_sd15_real_size_in_fp16(torch: Any, gpu: ModelManager) -> None:
    steps: list[int] = []

    def on_step(step: int, total: int) -> bool:
        steps.append(step)
        return True

    res = gpu.txt2img(
        "sd15-full", "a lighthouse", width=512, height=512, steps=3, seeds=[1, 2], on_step=on_step
    )
    images = [image for _, _, image in res.delivered()]
    assert [im.size for im in images] == [(512, 512), (512, 512)]
    assert steps[-1] == 3
    pipe = gpu.sd("sd15-full").pipe
    assert pipe.unet.dtype == torch.float16 and pipe.unet.device.type == "cuda"
    # The same seed again gives the same image (up to fp16 kernel noise); another seed differs.
    again = [im for _, _, im in gpu.txt2img("sd15-full", "a lighthouse", width=512, height=512,
                                            steps=3, seeds=[1]).delivered()][0]  # fmt: skip
    px = [np.asarray(im, dtype=np.float32) for im in (images[0], again, images[1])]
    assert np.abs(px[0] - px[1]).mean() < 1.0
    assert np.abs(px[0] - px[2]).mean() > 5.0
    assert gpu.load_count("sd15-full") == 1


def test_real_esrgan_x4_real_size_in_fp16(torch: Any, gpu: ModelManager) -> None:
    rng = np.random.default_rng(3)
    src = Image.fromarray(rng.integers(0, 255, (200, 256, 3), dtype=np.uint8), "RGB")
    out = gpu.upscale("realesrgan-x4plus-full", src)
    assert out.size == (1024, 800) and out.mode == "RGB"
    model = gpu.upscaler("realesrgan-x4plus-full").upsampler.model
    assert next(model.parameters()).dtype == torch.float16


def test_gfpgan_full_pipeline_on_cuda(
    torch: Any, models_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from skimage import data

    monkeypatch.chdir(tmp_path)  # GFPGANer must not look in ./gfpgan/weights
    # The kit's GFPGANv1Clean is the real architecture (512 px, channel multiplier 2).
    manager = ModelManager(models_registry, cache=ModelCache(GPU_CACHE_BYTES), device="cuda")
    src = Image.fromarray(data.astronaut()).resize((256, 256), Image.Resampling.BOX)
    res = manager.face_enhance("gfpgan-1.4", src)
    assert res.faces_detected >= 1 and res.faces_restored == 1
    assert res.image.size == (512, 512)


def test_rembg_on_cuda(torch: Any, models_registry: Registry) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
    manager = ModelManager(models_registry, cache=ModelCache(GPU_CACHE_BYTES), device="cuda")
    out = manager.remove_background("u2net", Image.new("RGB", (320, 240), (200, 30, 30)))
    assert out.mode == "RGBA" and out.size == (320, 240)
