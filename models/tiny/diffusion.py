"""Tiny Stable Diffusion pipelines saved as diffusers folders: ``build_sd15`` (a UNet with
block_out_channels (32, 64), the 4-level VAE, one small CLIP text encoder, no safety
checker) and ``build_sdxl`` (the same with two text encoders and text_time conditioning).
Each component is seeded separately, so the same seed gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from models.tiny.helpers import clip_text_config, clip_tokenizer, dpm_scheduler, set_seed, tiny_vae


def build_sd15(out: Path, seed: int) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = clip_tokenizer(out / "tokenizer")
    set_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    set_seed(seed + 1)
    vae = tiny_vae()
    set_seed(seed + 2)
    te = CLIPTextModel(clip_text_config(tok.vocab_size, tok.eos_token_id, tok.bos_token_id))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=dpm_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]


def build_sdxl(out: Path, seed: int) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = clip_tokenizer(out / "tokenizer")
    tok2 = clip_tokenizer(out / "tokenizer_2")
    set_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=32 + 6 * 8,
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    set_seed(seed + 1)
    vae = tiny_vae()
    set_seed(seed + 2)
    te = CLIPTextModel(clip_text_config(tok.vocab_size, tok.eos_token_id, tok.bos_token_id))
    set_seed(seed + 3)
    te2 = CLIPTextModelWithProjection(
        clip_text_config(tok2.vocab_size, tok2.eos_token_id, tok2.bos_token_id)
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=dpm_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
