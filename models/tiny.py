"""Tiny model kit: small, seeded, randomly initialised models in the real file formats.

``make_tiny(dir)`` writes, in about 10-20 s on two CPU cores:

* ``sd15/``  a diffusers Stable Diffusion 1.x folder (tiny UNet2DConditionModel with
  block_out_channels (32, 64), a 4-level AutoencoderKL so vae_scale_factor is 8, a tiny
  CLIPTextModel, a CLIPTokenizer built from a local byte-level vocab.json/merges.txt,
  DPMSolverMultistepScheduler with steps_offset=1, no safety checker);
* ``sdxl/``  the same for SDXL (two text encoders, text_time conditioning);
* ``RealESRGAN_x4plus.pth`` / ``RealESRGAN_x2plus.pth`` (tiny RRDBNet) and
  ``realesr-general-x4v3.pth`` (tiny SRVGGNetCompact), saved as ``{"params_ema": sd}``;
* ``GFPGANv1.4.pth``: GFPGANv1Clean at the real v1.4 size (GFPGANer only builds that),
  random weights, ~350 MB;
* ``facexlib/detection_Resnet50_Final.pth`` and ``facexlib/parsing_parsenet.pth``;
* ``rembg/models/u2net/u2net.onnx``: a U2Net-shaped ONNX graph (input 1x3x320x320,
  seven sigmoid 1x1x320x320 outputs), in rembg's own layout;
* ``models.toml``: a registry with ids ``sd15``, ``sdxl``, ``realesrgan-x4plus``,
  ``realesrgan-x2plus``, ``realesr-general-x4v3``, ``gfpgan-1.4``, ``u2net``.

The ParseNet face parser is random except for its mask head, which labels every pixel
"skin" so the paste-back mask covers the aligned face crop. The RetinaFace detector is
random except for its heads, which are set so that detection
is deterministic and meaningful for tests: box and landmark heads output the anchor box
and a canonical 5-point face layout, and the classification head fires only on the
stride-16 / 128 px anchors along one direction of the (random) feature space, calibrated
at build time so that flat images score far below facexlib's 0.97 threshold and the
astronaut photo from scikit-image scores above it. A random detector would otherwise
report hundreds of "faces" everywhere, which makes "no face" impossible to test.

Random weights produce noise images: the kit exercises code paths and file formats,
not quality. Building is deterministic (same seed, same bytes) and idempotent: if
``DIR/models.toml`` exists with the current :data:`KIT_VERSION`, nothing is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

from models.compat import ensure_basicsr_compat, set_offline_env

log = logging.getLogger(__name__)

KIT_VERSION = "tiny-2"
DEFAULT_SEED = 1234

# Canonical 5-point layout (eyes, nose, mouth corners) relative to the face box, in
# units of the box size, from facexlib's 512 px FFHQ template.
_FACE_POINTS = [
    (192.98, 239.95),
    (318.90, 240.19),
    (256.63, 314.02),
    (201.26, 371.41),
    (313.09, 371.15),
]


# --------------------------------------------------------------------------- helpers


def _seed(seed: int) -> None:
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


def _tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    write_clip_vocab(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def _text_config(vocab_size: int, eos_id: int, bos_id: int, hidden: int = 32) -> Any:
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


def _vae() -> Any:
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


def _scheduler() -> Any:
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )


# --------------------------------------------------------------------------- builders


def build_sd15(out: Path, seed: int) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = _tokenizer(out / "tokenizer")
    _seed(seed)
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
    _seed(seed + 1)
    vae = _vae()
    _seed(seed + 2)
    te = CLIPTextModel(_text_config(tok.vocab_size, tok.eos_token_id, tok.bos_token_id))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]


def build_sdxl(out: Path, seed: int) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = _tokenizer(out / "tokenizer")
    tok2 = _tokenizer(out / "tokenizer_2")
    _seed(seed)
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
    _seed(seed + 1)
    vae = _vae()
    _seed(seed + 2)
    te = CLIPTextModel(_text_config(tok.vocab_size, tok.eos_token_id, tok.bos_token_id))
    _seed(seed + 3)
    te2 = CLIPTextModelWithProjection(
        _text_config(tok2.vocab_size, tok2.eos_token_id, tok2.bos_token_id)
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]


def _save_params_ema(module: Any, path: Path) -> None:
    import torch

    sd = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    torch.save({"params_ema": sd}, path)


def build_esrgan(out: Path, seed: int) -> dict[str, Path]:
    ensure_basicsr_compat()
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    files = {
        "realesrgan-x4plus": out / "RealESRGAN_x4plus.pth",
        "realesrgan-x2plus": out / "RealESRGAN_x2plus.pth",
        "realesr-general-x4v3": out / "realesr-general-x4v3.pth",
    }
    _seed(seed)
    x4 = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, num_grow_ch=32, scale=4)
    _save_params_ema(x4, files["realesrgan-x4plus"])
    _seed(seed + 1)
    x2 = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, num_grow_ch=32, scale=2)
    _save_params_ema(x2, files["realesrgan-x2plus"])
    _seed(seed + 2)
    vgg = SRVGGNetCompact(
        num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=4, act_type="prelu"
    )
    _save_params_ema(vgg, files["realesr-general-x4v3"])
    return files


def build_gfpgan(out: Path, seed: int) -> Path:
    ensure_basicsr_compat()
    from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

    _seed(seed)
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
    _save_params_ema(net, path)
    return path


# Face position in skimage's astronaut photo (512 px): centre ~(225, 115), ~110 px wide.
# Positive training cells (row, col) on the stride-16 grid, per anchor:
# anchor 0 (64 px) on the 256 px copy, anchor 1 (128 px) on the 512 px original.
_FACE_CELLS = {0: (256, [(3, 6), (3, 7)]), 1: (512, [(7, 13), (7, 14)])}


def _calibration_images() -> tuple[dict[int, Any], list[Any]]:
    """({size: astronaut BGR}, [faceless BGR images]) as uint8 arrays."""
    import cv2
    import numpy as np
    from skimage import data

    astro = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    faces = {256: cv2.resize(astro, (256, 256), interpolation=cv2.INTER_AREA), 512: astro}
    flats = []
    for size, values in (
        (128, (0, 64, 128, 192, 255)),
        (256, (0, 32, 64, 96, 128, 160, 192, 224, 255)),
        (512, (128,)),
    ):
        for v in values:
            flats.append(np.full((size, size, 3), v, dtype=np.uint8))
    return faces, flats


def _retina_features(model: Any, img: Any) -> Any:
    """Stride-16 SSH features (rows, cols, 256) for a BGR uint8 image, as facexlib computes them."""
    import torch

    x = torch.from_numpy(img.astype("float32").transpose(2, 0, 1)).unsqueeze(0)
    x = x - model.mean_tensor
    with torch.no_grad():
        out = list(model.body(x).values())
        fpn = model.fpn(out)
        f = model.ssh2(fpn[1])
    return f[0].permute(1, 2, 0).double()


def _fit_linear(pos: Any, neg: Any) -> tuple[Any, float]:
    """Weighted logistic regression; returns (w, b) mapping the weakest positive to
    logit +8 and the strongest negative to -8. Raises if not separable."""
    import torch

    x = torch.cat([pos, neg])
    scale = float(x.std()) or 1.0
    x = x / scale
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    weight = torch.where(y > 0, len(neg) / len(pos), 1.0).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        logits = x @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=weight)
        loss = loss + 1e-4 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        s = x @ w + b
        lo = float(s[len(pos) :].max())
        hi = float(s[: len(pos)].min())
        if not hi > lo:
            raise RuntimeError("tiny RetinaFace calibration failed (not separable)")
        alpha = 16.0 / (hi - lo)
        mid = (hi + lo) / 2.0
        return (alpha * w / scale).detach(), float(alpha * (b - mid))


def build_facexlib(out: Path, seed: int) -> dict[str, Path]:
    ensure_basicsr_compat()
    import torch
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.parsenet import ParseNet

    out.mkdir(parents=True, exist_ok=True)
    _seed(seed)
    det = RetinaFace(network_name="resnet50", half=False, phase="test", device="cpu")
    det.eval()
    with torch.no_grad():
        # Box head -> the anchor itself; landmark head -> canonical 5 points in the anchor.
        for head in det.BboxHead:
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.zero_()
        pts = torch.tensor([((x - 256.0) / 512.0, (y - 256.0) / 512.0) for x, y in _FACE_POINTS])
        landm_bias = (pts.flatten() / 0.1).repeat(2)  # decode_landm: prior + pre*0.1*size
        for head in det.LandmarkHead:
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.copy_(landm_bias)
        # Class head: background everywhere ([bg, face] logits per anchor) ...
        for head in det.ClassHead:
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.copy_(torch.tensor([10.0, -10.0, 10.0, -10.0]))

    # ... except on the stride-16 level, where a linear "face" logit is fitted per anchor.
    faces, flats = _calibration_images()
    face_feats = {size: _retina_features(det, im) for size, im in faces.items()}
    flat_feats = torch.cat([_retina_features(det, im).reshape(-1, 256) for im in flats])
    head = det.ClassHead[1].conv1x1
    new_w = torch.zeros_like(head.weight)
    new_b = torch.tensor([0.0, -10.0, 0.0, -10.0])
    for anchor, (size, cells) in _FACE_CELLS.items():
        pos = torch.stack([face_feats[size][r, c] for r, c in cells])
        negs = [flat_feats]
        for fsize, feats in face_feats.items():
            rows, cols = feats.shape[:2]
            # cells of this image that overlap the face are neither positive nor negative
            cr, cc = (115 * fsize // 512) // 16, (225 * fsize // 512) // 16
            keep = [
                feats[r, c]
                for r in range(rows)
                for c in range(cols)
                if abs(r - cr) > 2 or abs(c - cc) > 2
            ]
            negs.append(torch.stack(keep))
        w, b = _fit_linear(pos, torch.cat(negs))
        new_w[2 * anchor + 1, :, 0, 0] = w.float()
        new_b[2 * anchor + 1] = b
    with torch.no_grad():
        head.weight.copy_(new_w)
        head.bias.copy_(new_b)
    det_path = out / "detection_Resnet50_Final.pth"
    torch.save({k: v.detach().clone() for k, v in det.state_dict().items()}, det_path)

    _seed(seed + 1)
    parse = ParseNet(in_size=512, out_size=512, parsing_ch=19)
    with torch.no_grad():
        # Random parsing would label most pixels as background/hair/etc. and GFPGAN's
        # paste-back (mask from the face classes) would paste nothing. Make the parser
        # say "skin" (class 1) everywhere, so the restored crop is visibly pasted back.
        conv = parse.out_mask_conv.conv2d
        conv.weight.zero_()
        conv.bias.zero_()
        conv.bias[1] = 1.0
    parse_path = out / "parsing_parsenet.pth"
    torch.save({k: v.detach().clone() for k, v in parse.state_dict().items()}, parse_path)
    return {"detection": det_path, "parsing": parse_path}


def build_u2net_onnx(path: Path, seed: int) -> Path:
    """A U2Net-shaped ONNX graph: 1x3x320x320 in, seven sigmoid 1x1x320x320 maps out."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float32)
    b1 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((1, 8, 5, 5)) * 0.2).astype(np.float32)
    b2 = np.zeros(1, dtype=np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["input.1", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node(
            "AveragePool",
            ["r1"],
            ["p1"],
            kernel_shape=[9, 9],
            pads=[4, 4, 4, 4],
            strides=[1, 1],
            count_include_pad=0,
        ),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[2, 2, 2, 2]),
        helper.make_node("Sigmoid", ["c2"], ["d0"]),
    ]
    outputs = [helper.make_tensor_value_info("d0", TensorProto.FLOAT, [1, 1, 320, 320])]
    for k in range(1, 7):
        nodes.append(helper.make_node("Identity", ["d0"], [f"d{k}"]))
        outputs.append(helper.make_tensor_value_info(f"d{k}", TensorProto.FLOAT, [1, 1, 320, 320]))
    graph = helper.make_graph(
        nodes,
        "tiny_u2net",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 320, 320])],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(
        graph, producer_name="tollgate-tiny", opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


REGISTRY_TEMPLATE = """\
# Tiny model kit ({kit}): random weights in real formats. Made by `tollgate models make-tiny`.
version = 1
kit_version = "{kit}"
seed = {seed}

[models.sd15]
family = "sd15"
path = "sd15"
description = "tiny Stable Diffusion 1.x (random weights)"
[models.sd15.defaults]
steps = 4
guidance = 7.5
width = 64
height = 64
{sdxl}
[models.realesrgan-x4plus]
family = "esrgan"
path = "RealESRGAN_x4plus.pth"
description = "tiny RRDBNet x4"
[models.realesrgan-x4plus.defaults]
scale = 4
tile = 128

[models.realesrgan-x2plus]
family = "esrgan"
path = "RealESRGAN_x2plus.pth"
description = "tiny RRDBNet x2"
[models.realesrgan-x2plus.defaults]
scale = 2
tile = 128

[models.realesr-general-x4v3]
family = "esrgan"
path = "realesr-general-x4v3.pth"
description = "tiny SRVGGNetCompact x4"
[models.realesr-general-x4v3.defaults]
scale = 4
tile = 128
alpha_upsampler = "resize"

[models."gfpgan-1.4"]
family = "gfpgan"
path = "GFPGANv1.4.pth"
facexlib_dir = "facexlib"
description = "GFPGANv1Clean at v1.4 size, random weights; calibrated tiny RetinaFace"
[models."gfpgan-1.4".defaults]
upscale = 2
max_faces = 1

[models.u2net]
family = "rembg"
path = "rembg/models/u2net/u2net.onnx"
description = "U2Net-shaped ONNX (random weights)"
"""

SDXL_BLOCK = """
[models.sdxl]
family = "sdxl"
path = "sdxl"
description = "tiny SDXL (random weights)"
[models.sdxl.defaults]
steps = 4
guidance = 5.0
width = 64
height = 64
"""


def kit_is_current(folder: Path) -> bool:
    toml = folder / "models.toml"
    if not toml.is_file():
        return False
    try:
        data = tomllib.loads(toml.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return data.get("kit_version") == KIT_VERSION


def make_tiny(
    folder: str | Path,
    *,
    seed: int = DEFAULT_SEED,
    sdxl: bool = True,
    gfpgan: bool = True,
    force: bool = False,
) -> Path:
    """Build the tiny kit into ``folder`` and return the path of ``folder/models.toml``.

    Skips all work when ``models.toml`` already carries the current kit version (unless
    ``force``). ``models.toml`` is written last, so an interrupted build is redone.
    ``gfpgan=False`` skips the ~550 MB of GFPGAN/facexlib weights (their registry entry
    is then omitted).
    """
    set_offline_env()
    out = Path(folder).expanduser().resolve()
    toml = out / "models.toml"
    if not force and kit_is_current(out):
        log.info("tiny kit already present in %s", out)
        return toml
    out.mkdir(parents=True, exist_ok=True)
    if toml.exists():
        toml.unlink()

    import torch

    threads = torch.get_num_threads()
    try:
        for sub in ("sd15", "sdxl", "facexlib", "rembg"):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
        steps: list[tuple[str, Any]] = [("sd15", lambda: build_sd15(out / "sd15", seed))]
        if sdxl:
            steps.append(("sdxl", lambda: build_sdxl(out / "sdxl", seed + 100)))
        steps.append(("esrgan", lambda: build_esrgan(out, seed + 200)))
        if gfpgan:
            steps.append(("gfpgan", lambda: build_gfpgan(out, seed + 300)))
            steps.append(("facexlib", lambda: build_facexlib(out / "facexlib", seed + 400)))
        u2 = out / "rembg" / "models" / "u2net" / "u2net.onnx"
        steps.append(("u2net", lambda: build_u2net_onnx(u2, seed + 500)))
        for name, fn in steps:
            t0 = time.perf_counter()
            fn()
            log.info("tiny kit: %s built in %.1f s", name, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)

    text = REGISTRY_TEMPLATE.format(kit=KIT_VERSION, seed=seed, sdxl=SDXL_BLOCK if sdxl else "")
    if not gfpgan:
        head = '[models."gfpgan-1.4"]'
        start = text.index(head)
        end = text.index("[models.u2net]")
        text = text[:start] + text[end:]
    tmp = toml.with_suffix(".toml.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, toml)
    return toml
