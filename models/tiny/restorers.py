"""Tiny Real-ESRGAN and GFPGAN checkpoints, saved as ``{"params_ema": sd}`` like the
released files: ``build_esrgan`` writes a tiny RRDBNet x4 and x2 and a tiny
SRVGGNetCompact x4, and ``build_gfpgan`` writes GFPGANv1Clean at the real v1.4 size
(random weights, ~350 MB), because that is the only architecture GFPGANer builds.
"""

from __future__ import annotations

from pathlib import Path

from models.compat import ensure_basicsr_compat
from models.tiny.helpers import save_params_ema, set_seed


def build_esrgan(out: Path, seed: int) -> dict[str, Path]:
    ensure_basicsr_compat()
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    files = {
        "realesrgan-x4plus": out / "RealESRGAN_x4plus.pth",
        "realesrgan-x2plus": out / "RealESRGAN_x2plus.pth",
        "realesr-general-x4v3": out / "realesr-general-x4v3.pth",
    }
    set_seed(seed)
    x4 = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, num_grow_ch=32, scale=4)
    save_params_ema(x4, files["realesrgan-x4plus"])
    set_seed(seed + 1)
    x2 = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, num_grow_ch=32, scale=2)
    save_params_ema(x2, files["realesrgan-x2plus"])
    set_seed(seed + 2)
    vgg = SRVGGNetCompact(
        num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=4, act_type="prelu"
    )
    save_params_ema(vgg, files["realesr-general-x4v3"])
    return files


def build_gfpgan(out: Path, seed: int) -> Path:
    ensure_basicsr_compat()
    from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

    set_seed(seed)
    # Exactly what GFPGANer(arch="clean", channel_multiplier=2) constructs.
    net = GFPGANv1Clean(
        out_size=512,
        num_style_feat=512,
        channel_multiplier=2,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=8,
        input_is_latent=True,
        different_w=True,
        narrow=1,
        sft_half=True,
    )
    path = out / "GFPGANv1.4.pth"
    save_params_ema(net, path)
    return path
