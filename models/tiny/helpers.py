"""Shared pieces of the tiny kit's builders: seeding torch, a small local byte-level CLIP
vocabulary and its tokenizer, the CLIP text-encoder config, the 4-level VAE, the
DPM-Solver scheduler, and saving a module as a Real-ESRGAN-style ``{"params_ema": sd}``
checkpoint. ``models/fullsize.py`` reuses them for its real-size builders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def set_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet (same table as CLIP's tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_vocab(folder: Path) -> int:
    """Write a small byte-level CLIP vocab.json/merges.txt; return the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    # A handful of merges so common words are not all single characters.
    merges = ["t h", "th e</w>", "a n", "o n", "i n", "e r", "p h", "o t"]
    for m in merges:
        a, b = m.split(" ")
        tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    return len(vocab)


def clip_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    write_clip_vocab(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def clip_text_config(vocab_size: int, eos_id: int, bos_id: int, hidden: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu",
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def dpm_scheduler() -> Any:
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )


def save_params_ema(module: Any, path: Path) -> None:
    import torch

    sd = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    torch.save({"params_ema": sd}, path)
