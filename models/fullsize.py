"""Real-size architectures with random, seeded weights, in the real formats: for the GPU tests
(`tests/models/test_gpu.py`, marked `gpu`) and GPU benchmarks, where the tiny kit's toy
sizes would not exercise fp16 kernels, memory or speed.

- ``build_sd15_full``: a diffusers SD 1.x folder with SD 1.5's UNet (~860M parameters), VAE
  (~84M) and a CLIP ViT-L/14-shaped text encoder, saved in fp16 (about 2 GB). Only the
  tokenizer is small (the tiny kit's local vocabulary; nothing is downloaded), so the text
  encoder's embedding table is smaller than the real one.
- ``build_esrgan_x4_full``: RealESRGAN_x4plus's RRDBNet (23 blocks, 64 features, ~16.7M
  parameters) as a ``params_ema`` state dict.

GFPGAN needs nothing here: the tiny kit's GFPGANv1Clean is already the real architecture.
``registry_toml`` writes a registry for what was built. Nothing is fetched at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from models.compat import ensure_basicsr_compat
from models.tiny.helpers import (
    clip_text_config,
    clip_tokenizer,
    dpm_scheduler,
    save_params_ema,
    set_seed,
)

SD15_UNET: Final[dict[str, Any]] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE: Final[dict[str, Any]] = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 32,
}
# CLIP ViT-L/14's text tower (the vocabulary comes from the tokenizer).
SD15_TEXT: Final[dict[str, int]] = {
    "hidden": 768,
    "layers": 12,
    "heads": 12,
    "intermediate": 3072,
}
ESRGAN_X4: Final[dict[str, int]] = {
    "num_in_ch": 3,
    "num_out_ch": 3,
    "num_feat": 64,
    "num_block": 23,
    "num_grow_ch": 32,
    "scale": 4,
}


def sd15_components(seed: int, tokenizer: Any) -> dict[str, Any]:
    """UNet, VAE and text encoder at SD 1.5's sizes, seeded, in fp32 on the CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    set_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    set_seed(seed + 1)
    vae = AutoencoderKL(**SD15_VAE)
    set_seed(seed + 2)
    config = clip_text_config(
        tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.bos_token_id, SD15_TEXT["hidden"]
    )
    config.num_hidden_layers = SD15_TEXT["layers"]
    config.num_attention_heads = SD15_TEXT["heads"]
    config.intermediate_size = SD15_TEXT["intermediate"]
    text_encoder = CLIPTextModel(config)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def build_sd15_full(out: Path, seed: int) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline

    tok = clip_tokenizer(out / "tokenizer")
    parts = sd15_components(seed, tok)
    pipe = StableDiffusionPipeline(
        **parts,
        tokenizer=tok,
        scheduler=dpm_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    return out


def build_esrgan_x4_full(path: Path, seed: int) -> Path:
    ensure_basicsr_compat()
    from basicsr.archs.rrdbnet_arch import RRDBNet

    set_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_params_ema(RRDBNet(**ESRGAN_X4), path)
    return path


def registry_toml(sd15: Path | None = None, esrgan_x4: Path | None = None) -> str:
    """Registry entries `sd15-full` and `realesrgan-x4plus-full` for what was built."""
    parts = []
    if sd15 is not None:
        parts.append(f'[models."sd15-full"]\nfamily = "sd15"\npath = "{sd15}"\n')
    if esrgan_x4 is not None:
        parts.append(
            f'[models."realesrgan-x4plus-full"]\nfamily = "esrgan"\npath = "{esrgan_x4}"\n'
            '[models."realesrgan-x4plus-full".defaults]\nscale = 4\n'
        )
    return "\n".join(parts)
