from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import Canceled, InvalidRequest
from models.lora import LoraTrainConfig, instance_prompt, latest_checkpoint, prepare_images


def _images() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]


CFG = LoraTrainConfig(
    token="zwx",
    subject="person",
    steps=6,
    batch_size=2,
    checkpoint_every=3,
    resolution=64,
    learning_rate=1e-2,
    seed=3,
)


def test_prepare_images_centre_crop() -> None:
    t = prepare_images([Image.new("RGB", (120, 60), (255, 0, 0))], 32)
    assert tuple(t.shape) == (1, 3, 32, 32)
    assert float(t[0, 0].min()) == pytest.approx(1.0) and float(t[0, 1].max()) == pytest.approx(
        -1.0
    )
    assert instance_prompt("zwx", "dog") == "a photo of zwx dog"


def test_train_cancel_resume_and_render(models_manager, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    full = models_manager.train_lora("sd15", _images(), tmp_path / "full", CFG)
    assert full.weights.is_file() and len(full.losses) == 6
    assert latest_checkpoint(tmp_path / "full") is not None  # step-3 checkpoint

    steps: list[int] = []

    def stop_after_two(step: int, total: int) -> bool:
        steps.append(step)
        return step < 2

    with pytest.raises(Canceled):
        models_manager.train_lora("sd15", _images(), tmp_path / "part", CFG, on_step=stop_after_two)
    assert steps == [1, 2]
    resumed = models_manager.train_lora("sd15", _images(), tmp_path / "part", CFG)
    assert resumed.resumed_from == 2
    a, b = load_file(full.weights), load_file(resumed.weights)
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)

    prompt = CFG.prompt
    base = models_manager.txt2img("sd15", prompt, steps=3, seeds=[4]).images[0]
    with_lora = models_manager.txt2img(
        "sd15", prompt, steps=3, seeds=[4], lora=full.output_dir
    ).images[0]
    zero = models_manager.txt2img(
        "sd15", prompt, steps=3, seeds=[4], lora=full.output_dir, lora_scale=0.0
    )
    again = models_manager.txt2img("sd15", prompt, steps=3, seeds=[4]).images[0]
    px = lambda im: np.asarray(im, dtype=np.float64)  # noqa: E731
    assert np.abs(px(base) - px(with_lora)).mean() > 1e-3
    assert np.array_equal(px(base), px(zero.images[0]))
    assert np.array_equal(px(base), px(again))
    assert models_manager.load_count("sd15") == 1  # LoRA loads into the warm pipeline


def test_a_non_diffusion_base_is_rejected(models_manager, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="sd15, sdxl"):
        models_manager.train_lora("realesrgan-x4plus", _images(), tmp_path, CFG)
