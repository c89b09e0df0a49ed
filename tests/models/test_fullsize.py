"""The real-size builders (models/fullsize.py) on the CPU: SD 1.5's component sizes checked on
the meta device (no memory, no time), and the real-size Real-ESRGAN x4 built, loaded through
the product's registry and Upscaler, and run on a small image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from models.fullsize import build_esrgan_x4_full, registry_toml, sd15_components
from models.manager import ModelManager
from models.registry import load_registry
from models.tiny.helpers import clip_tokenizer

# Parameter counts of the released SD 1.5 UNet and VAE, and of CLIP ViT-L/14's text tower
# with its 49408-token vocabulary.
SD15_UNET_PARAMS = 859_520_964
SD15_VAE_PARAMS = 83_653_863
CLIP_L_TEXT_PARAMS = 123_060_480
CLIP_L_VOCAB = 49_408


def test_sd15_components_have_the_released_sizes(tmp_path: Path) -> None:
    from accelerate import init_empty_weights

    tok = clip_tokenizer(tmp_path / "tokenizer")
    with init_empty_weights():
        parts = sd15_components(1, tok)
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    assert count["unet"] == SD15_UNET_PARAMS
    assert count["vae"] == SD15_VAE_PARAMS
    hidden = parts["text_encoder"].config.hidden_size
    assert count["text_encoder"] == CLIP_L_TEXT_PARAMS - (CLIP_L_VOCAB - tok.vocab_size) * hidden


def test_real_size_esrgan_x4_loads_and_upscales_on_cpu(tmp_path: Path) -> None:
    weights = build_esrgan_x4_full(tmp_path / "RealESRGAN_x4plus.pth", seed=7)
    (tmp_path / "models.toml").write_text(registry_toml(esrgan_x4=weights))
    manager = ModelManager(load_registry(tmp_path / "models.toml"), device="cpu")
    rgba = np.zeros((16, 20, 4), dtype=np.uint8)
    rgba[..., :3] = np.random.default_rng(0).integers(0, 255, (16, 20, 3))
    rgba[:, 10:, 3] = 255
    out = manager.upscale("realesrgan-x4plus-full", Image.fromarray(rgba, "RGBA"))
    # x4plus runs alpha through the network (the library default), here random weights: only
    # the shape is checked; tests/models/test_esrgan.py checks alpha kept by resize.
    assert out.size == (80, 64) and out.mode == "RGBA"
    upscaler = manager.upscaler("realesrgan-x4plus-full")
    assert (
        upscaler.spec.arch == "RRDBNet"
        and sum(p.numel() for p in upscaler.upsampler.model.parameters()) == 16_697_987
    )
