from __future__ import annotations

from pathlib import Path

import pytest

from models.errors import ModelConfigError, ModelFileMissing, UnknownModel
from models.registry import (
    ESRGANOptions,
    GFPGANOptions,
    RembgOptions,
    SDOptions,
    load_registry,
    parse_registry,
)

KIT_IDS = {
    "sd15",
    "sdxl",
    "realesrgan-x4plus",
    "realesrgan-x2plus",
    "realesr-general-x4v3",
    "gfpgan-1.4",
    "u2net",
}


def test_kit_registry_is_typed(models_registry) -> None:
    reg = models_registry
    assert set(reg.ids()) == KIT_IDS
    assert isinstance(reg.get("sd15").options, SDOptions)
    assert reg.get("sdxl").family == "sdxl"
    x2 = reg.get("realesrgan-x2plus").options
    assert isinstance(x2, ESRGANOptions) and x2.scale == 2
    gf = reg.get("gfpgan-1.4")
    assert isinstance(gf.options, GFPGANOptions) and gf.facexlib_dir is not None
    assert isinstance(reg.get("u2net").options, RembgOptions)
    assert reg.kit_version is not None
    reg.check_files()  # all present


def test_unknown_id(models_registry) -> None:
    with pytest.raises(UnknownModel, match="nope"):
        models_registry.get("nope")


def test_env_var_is_used(models_env, models_registry_path: Path) -> None:
    models_env.setenv("TOLLGATE_MODELS", str(models_registry_path))
    assert "sd15" in load_registry()


def test_no_registry_configured(models_env) -> None:
    with pytest.raises(ModelConfigError, match="TOLLGATE_MODELS"):
        load_registry()


def test_missing_registry_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileMissing) as ei:
        load_registry(tmp_path / "models.toml")
    assert ei.value.path == tmp_path / "models.toml"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "models.toml"
    p.write_text(text)
    return p


def test_missing_weight_names_file_and_place(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        'version = 1\n[models.up]\nfamily = "esrgan"\npath = "weights/RealESRGAN_x4plus.pth"\n',
    )
    with pytest.raises(ModelFileMissing) as ei:
        load_registry(p)
    err = ei.value
    assert err.path == tmp_path / "weights" / "RealESRGAN_x4plus.pth"
    assert "RealESRGAN_x4plus.pth" in str(err) and "'up'" in str(err)
    # without the check the registry parses, and check_files reports the same file
    reg = load_registry(p, check_files=False)
    assert [m.path for m in reg.missing_files()] == [err.path]


def test_missing_facexlib_weights(tmp_path: Path) -> None:
    (tmp_path / "GFPGANv1.4.pth").write_bytes(b"x")
    p = _write(
        tmp_path,
        'version = 1\n[models.gf]\nfamily = "gfpgan"\npath = "GFPGANv1.4.pth"\n'
        'facexlib_dir = "fx"\n',
    )
    with pytest.raises(ModelFileMissing) as ei:
        load_registry(p)
    assert ei.value.path == tmp_path / "fx" / "detection_Resnet50_Final.pth"
    assert "parsing_parsenet.pth" in str(ei.value)  # "also missing" list


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('[models.a]\nfamily = "dalle"\npath = "x"\n', "family"),
        ('[models.a]\nfamily = "esrgan"\n', "path"),
        ('[models.a]\nfamily = "esrgan"\npath = "x"\n[models.a.defaults]\nscale = 3\n', "scale"),
        (
            '[models.a]\nfamily = "esrgan"\npath = "x"\n[models.a.defaults]\nwidth = 64\n',
            "unknown option",
        ),
        (
            '[models.a]\nfamily = "sd15"\npath = "x"\n[models.a.defaults]\nsteps = "many"\n',
            "wrong type",
        ),
        ('[models.a]\nfamily = "gfpgan"\npath = "x"\n', "facexlib_dir"),
        (
            '[models.a]\nfamily = "gfpgan"\npath = "x"\nfacexlib_dir = "f"\n[models.a.defaults]\n'
            'bg_upsampler = "missing"\n',
            "bg_upsampler",
        ),
        ('[models.a]\nfamily = "rembg"\npath = "x"\ncolor = 1\n', "unknown key"),
    ],
)
def test_invalid_registry(tmp_path: Path, body: str, match: str) -> None:
    p = _write(tmp_path, "version = 1\n" + body)
    with pytest.raises(ModelConfigError, match=match):
        load_registry(p, check_files=False)


def test_sdxl_defaults_and_relative_paths(tmp_path: Path) -> None:
    reg = parse_registry({"models": {"xl": {"family": "sdxl", "path": "xl"}}}, tmp_path)
    entry = reg.get("xl")
    assert entry.path == tmp_path / "xl"
    assert isinstance(entry.options, SDOptions) and entry.options.width == 1024
    names = {p.name for p, _ in entry.required_files()}
    assert {"model_index.json", "text_encoder_2", "tokenizer_2"} <= names
