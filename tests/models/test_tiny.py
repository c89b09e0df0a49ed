from __future__ import annotations

import time
import tomllib
from pathlib import Path

from click.testing import CliRunner

from models.cli import models as models_group
from models.tiny import (
    KIT_VERSION,
    build_esrgan,
    build_sd15,
    build_u2net_onnx,
    kit_is_current,
    make_tiny,
)


def _seed(kit: Path) -> int:
    return int(tomllib.loads((kit / "models.toml").read_text())["seed"])


def test_kit_layout(models_kit_dir: Path) -> None:
    kit = models_kit_dir
    assert kit_is_current(kit)
    for rel in (
        "sd15/model_index.json",
        "sd15/unet/diffusion_pytorch_model.safetensors",
        "sd15/tokenizer/vocab.json",
        "sd15/tokenizer/merges.txt",
        "sdxl/text_encoder_2/config.json",
        "RealESRGAN_x4plus.pth",
        "RealESRGAN_x2plus.pth",
        "realesr-general-x4v3.pth",
        "GFPGANv1.4.pth",
        "facexlib/detection_Resnet50_Final.pth",
        "facexlib/parsing_parsenet.pth",
        "rembg/models/u2net/u2net.onnx",
    ):
        assert (kit / rel).is_file(), rel
    assert tomllib.loads((kit / "models.toml").read_text())["kit_version"] == KIT_VERSION


def test_idempotent(models_kit_dir: Path) -> None:
    toml = models_kit_dir / "models.toml"
    before = toml.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert make_tiny(models_kit_dir) == toml
    assert time.perf_counter() - t0 < 2.0
    assert toml.stat().st_mtime_ns == before


def test_deterministic_bytes(models_kit_dir: Path, tmp_path: Path) -> None:
    seed = _seed(models_kit_dir)
    build_sd15(tmp_path / "sd15", seed)
    build_esrgan(tmp_path, seed + 200)
    build_u2net_onnx(tmp_path / "u2net.onnx", seed + 500)
    pairs = [
        (
            "sd15/unet/diffusion_pytorch_model.safetensors",
            "sd15/unet/diffusion_pytorch_model.safetensors",
        ),
        (
            "sd15/vae/diffusion_pytorch_model.safetensors",
            "sd15/vae/diffusion_pytorch_model.safetensors",
        ),
        ("sd15/text_encoder/model.safetensors", "sd15/text_encoder/model.safetensors"),
        ("sd15/tokenizer/vocab.json", "sd15/tokenizer/vocab.json"),
        ("RealESRGAN_x4plus.pth", "RealESRGAN_x4plus.pth"),
        ("realesr-general-x4v3.pth", "realesr-general-x4v3.pth"),
        ("rembg/models/u2net/u2net.onnx", "u2net.onnx"),
    ]
    for kit_rel, new_rel in pairs:
        assert (models_kit_dir / kit_rel).read_bytes() == (tmp_path / new_rel).read_bytes(), kit_rel


def test_cli_make_tiny_and_check(models_kit_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(models_group, ["make-tiny", str(models_kit_dir)])
    assert res.exit_code == 0, res.output
    assert "models.toml" in res.output
    res = runner.invoke(models_group, ["check", "--registry", str(models_kit_dir / "models.toml")])
    assert res.exit_code == 0, res.output
    assert "gfpgan-1.4" in res.output

    bad = tmp_path / "models.toml"
    bad.write_text('version = 1\n[models.up]\nfamily = "esrgan"\npath = "nope.pth"\n')
    res = runner.invoke(models_group, ["check", "--registry", str(bad)])
    assert res.exit_code == 1
    assert "nope.pth" in res.output
