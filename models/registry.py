"""Model registry: a TOML file mapping model id -> family, local path and defaults.

The registry path comes from ``$TOLLGATE_MODELS`` unless given explicitly. Relative
paths inside the file resolve against the folder that holds the file. Nothing here
downloads anything: a missing file is a :class:`~models.errors.ModelFileMissing`
that names the file and what belongs there.

Example::

    version = 1

    [models.sd15]
    family = "sd15"
    path = "sd15"                       # a diffusers folder (model_index.json, unet/, ...)
    [models.sd15.defaults]
    steps = 25
    guidance = 7.5
    width = 512
    height = 512

    [models.realesrgan-x4plus]
    family = "esrgan"
    path = "RealESRGAN_x4plus.pth"
    [models.realesrgan-x4plus.defaults]
    scale = 4
    tile = 512

    [models."gfpgan-1.4"]
    family = "gfpgan"
    path = "GFPGANv1.4.pth"
    facexlib_dir = "facexlib"           # detection_Resnet50_Final.pth + parsing_parsenet.pth

    [models.u2net]
    family = "rembg"
    path = "rembg/models/u2net/u2net.onnx"
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from models.errors import ModelConfigError, ModelFileMissing, UnknownModel

ENV_REGISTRY = "TOLLGATE_MODELS"
REGISTRY_VERSION = 1

Family = Literal["sd15", "sdxl", "esrgan", "gfpgan", "rembg"]
FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "esrgan", "gfpgan", "rembg")

# Files that must exist for each family; sd families are folders.
FACEXLIB_FILES = ("detection_Resnet50_Final.pth", "parsing_parsenet.pth")
_SD_REQUIRED = ("model_index.json", "unet/config.json", "vae/config.json", "scheduler")
_SDXL_EXTRA = ("text_encoder_2", "tokenizer_2")


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SDOptions:
    """Defaults for ``sd15``/``sdxl`` entries (each overridable per job)."""

    steps: int = 25
    guidance: float = 7.5
    width: int = 512
    height: int = 512
    max_images: int = 8
    max_side: int = 2048
    # Use the folder's own safety checker when it ships one (diffusers' checker).
    safety_checker: bool = True
    # Optional diffusers scheduler class name to swap in (e.g. "EulerDiscreteScheduler").
    scheduler: str | None = None


@dataclass(frozen=True)
class ESRGANOptions:
    """Defaults for ``esrgan`` entries."""

    scale: int = 4
    # "auto" infers RRDBNet / SRVGGNetCompact and their sizes from the state dict.
    arch: str = "auto"
    # Tile edge in input pixels (0 = one pass). Bounds memory for large inputs.
    tile: int = 512
    tile_pad: int = 10
    pre_pad: int = 10
    # "realesrgan" runs the alpha channel through the network, "resize" uses cv2.
    alpha_upsampler: str = "realesrgan"
    # None = fp16 on CUDA, fp32 on CPU.
    half: bool | None = None
    max_input_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class GFPGANOptions:
    """Defaults for ``gfpgan`` entries."""

    upscale: int = 2
    arch: str = "clean"
    channel_multiplier: int = 2
    # A randomly initialised (or confused) detector can report hundreds of faces.
    max_faces: int = 8
    weight: float = 0.5
    only_center_face: bool = False
    eye_dist_threshold: float = 5.0
    # Model id of an esrgan entry used to upsample the background (None = cv2 resize).
    bg_upsampler: str | None = None
    max_input_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class RembgOptions:
    """Defaults for ``rembg`` entries."""

    # Session kind: "u2net" (u2net, u2netp, u2net_human_seg, silueta files),
    # "dis" (isnet-*), "ben". Selects rembg's matching *_custom session.
    arch: str = "u2net"
    alpha_matting: bool = False
    alpha_matting_foreground_threshold: int = 240
    alpha_matting_background_threshold: int = 10
    alpha_matting_erode_size: int = 10
    post_process_mask: bool = False
    max_input_pixels: int = 4096 * 4096


Options = SDOptions | ESRGANOptions | GFPGANOptions | RembgOptions

_OPTIONS_FOR: dict[str, type] = {
    "sd15": SDOptions,
    "sdxl": SDOptions,
    "esrgan": ESRGANOptions,
    "gfpgan": GFPGANOptions,
    "rembg": RembgOptions,
}
_SDXL_DEFAULTS = {"width": 1024, "height": 1024, "steps": 30, "guidance": 5.0}


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class ModelEntry:
    """One registry entry."""

    id: str
    family: Family
    path: Path
    options: Options
    description: str = ""
    facexlib_dir: Path | None = None  # gfpgan only

    def required_files(self) -> list[tuple[Path, str]]:
        """(path, hint) for every file this entry needs on disk."""
        fam = self.family
        out: list[tuple[Path, str]] = []
        if fam in ("sd15", "sdxl"):
            kind = "SDXL" if fam == "sdxl" else "Stable Diffusion 1.x"
            hint = f"{kind} diffusers folder for {self.id!r} (save_pretrained layout)"
            names = _SD_REQUIRED + (_SDXL_EXTRA if fam == "sdxl" else ())
            out.append((self.path, hint))
            out.extend((self.path / n, hint) for n in names)
        elif fam == "esrgan":
            out.append((self.path, f"Real-ESRGAN weights for {self.id!r} (.pth with params_ema)"))
        elif fam == "gfpgan":
            out.append((self.path, f"GFPGAN weights for {self.id!r} (e.g. GFPGANv1.4.pth)"))
            fx = self.facexlib_dir
            assert fx is not None
            for name in FACEXLIB_FILES:
                out.append((fx / name, f"facexlib weights for {self.id!r}, kept in facexlib_dir"))
        elif fam == "rembg":
            out.append((self.path, f"rembg ONNX model for {self.id!r} (e.g. u2net.onnx)"))
        return out

    def missing_files(self) -> list[ModelFileMissing]:
        return [ModelFileMissing(p, h) for p, h in self.required_files() if not p.exists()]

    def check_files(self) -> None:
        """Raise :class:`ModelFileMissing` for the first missing file."""
        missing = self.missing_files()
        if missing:
            raise missing[0]


@dataclass
class Registry:
    """All entries of one registry file."""

    source: Path | None
    entries: dict[str, ModelEntry] = field(default_factory=dict)
    kit_version: str | None = None

    def __contains__(self, model_id: object) -> bool:
        return model_id in self.entries

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, model_id: str) -> ModelEntry:
        try:
            return self.entries[model_id]
        except KeyError:
            raise UnknownModel(model_id, list(self.entries)) from None

    def ids(self, family: str | None = None) -> list[str]:
        return [e.id for e in self.entries.values() if family is None or e.family == family]

    def missing_files(self, ids: list[str] | None = None) -> list[ModelFileMissing]:
        chosen = [self.get(i) for i in ids] if ids is not None else list(self.entries.values())
        return [m for e in chosen for m in e.missing_files()]

    def check_files(self, ids: list[str] | None = None) -> None:
        """Worker start-up check: raise :class:`ModelFileMissing` for the first missing file
        (of ``ids``, or of every entry). The message lists how many others are missing."""
        missing = self.missing_files(ids)
        if not missing:
            return
        first = missing[0]
        if len(missing) > 1:
            others = ", ".join(str(m.path) for m in missing[1:4])
            more = "" if len(missing) <= 4 else f" and {len(missing) - 4} more"
            raise ModelFileMissing(first.path, f"{first.hint}; also missing: {others}{more}")
        raise first


# --------------------------------------------------------------------------- parsing


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _build_options(cls: type, table: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ModelConfigError(f"{where}: unknown option(s) {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if not _type_ok(value, hints[key]):
            raise ModelConfigError(f"{where}: option {key!r} has wrong type ({value!r})")
        kwargs[key] = float(value) if hints[key] is float else value
    return cls(**kwargs)


def _validate_options(model_id: str, opts: Any) -> None:
    where = f"model {model_id!r}"
    if isinstance(opts, SDOptions):
        for side in (opts.width, opts.height):
            if side <= 0 or side % 8:
                raise ModelConfigError(f"{where}: width/height must be positive multiples of 8")
        if not 1 <= opts.max_images <= 64:
            raise ModelConfigError(f"{where}: max_images must be 1..64")
    elif isinstance(opts, ESRGANOptions):
        if opts.scale not in (1, 2, 4):
            raise ModelConfigError(f"{where}: scale must be 1, 2 or 4")
        if opts.arch not in ("auto", "RRDBNet", "SRVGGNetCompact"):
            raise ModelConfigError(f"{where}: arch must be auto, RRDBNet or SRVGGNetCompact")
        if opts.alpha_upsampler not in ("realesrgan", "resize"):
            raise ModelConfigError(f"{where}: alpha_upsampler must be realesrgan or resize")
        if opts.tile < 0:
            raise ModelConfigError(f"{where}: tile must be >= 0")
    elif isinstance(opts, GFPGANOptions):
        if opts.arch not in ("clean", "bilinear", "original", "RestoreFormer"):
            raise ModelConfigError(f"{where}: unknown GFPGAN arch {opts.arch!r}")
        if opts.max_faces < 1:
            raise ModelConfigError(f"{where}: max_faces must be >= 1")
        if not 1 <= opts.upscale <= 8:
            raise ModelConfigError(f"{where}: upscale must be 1..8")
    elif isinstance(opts, RembgOptions) and opts.arch not in ("u2net", "dis", "ben"):
        raise ModelConfigError(f"{where}: rembg arch must be u2net, dis or ben")


def _parse_entry(model_id: str, raw: Any, base: Path) -> ModelEntry:
    where = f"model {model_id!r}"
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{where}: expected a table")
    allowed = {"family", "path", "defaults", "description", "facexlib_dir"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ModelConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    family = raw.get("family")
    if family not in FAMILIES:
        raise ModelConfigError(
            f"{where}: family must be one of {', '.join(FAMILIES)}, got {family!r}"
        )
    path = raw.get("path")
    if not isinstance(path, str) or not path:
        raise ModelConfigError(f"{where}: 'path' (string) is required")
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ModelConfigError(f"{where}: 'defaults' must be a table")
    if family == "sdxl":
        defaults = {**_SDXL_DEFAULTS, **defaults}
    opts = _build_options(_OPTIONS_FOR[family], defaults, where)
    _validate_options(model_id, opts)

    facexlib_dir: Path | None = None
    if family == "gfpgan":
        fx = raw.get("facexlib_dir")
        if not isinstance(fx, str) or not fx:
            raise ModelConfigError(f"{where}: gfpgan entries need 'facexlib_dir' (string)")
        facexlib_dir = _resolve(base, fx)
    elif "facexlib_dir" in raw:
        raise ModelConfigError(f"{where}: 'facexlib_dir' is only valid for gfpgan entries")

    desc = raw.get("description", "")
    if not isinstance(desc, str):
        raise ModelConfigError(f"{where}: 'description' must be a string")
    return ModelEntry(
        id=model_id,
        family=family,
        path=_resolve(base, path),
        options=opts,
        description=desc,
        facexlib_dir=facexlib_dir,
    )


def _resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expandvars(os.path.expanduser(value)))
    return p if p.is_absolute() else (base / p)


def parse_registry(data: Mapping[str, Any], base: Path, source: Path | None = None) -> Registry:
    """Build a :class:`Registry` from already-parsed TOML data (no file checks)."""
    version = data.get("version", REGISTRY_VERSION)
    if version != REGISTRY_VERSION:
        raise ModelConfigError(
            f"registry version {version!r} not supported (want {REGISTRY_VERSION})"
        )
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ModelConfigError("registry has no [models.<id>] tables")
    kit = data.get("kit_version")
    reg = Registry(source=source, kit_version=str(kit) if kit is not None else None)
    for model_id, raw in models.items():
        reg.entries[model_id] = _parse_entry(model_id, raw, base)
    for entry in reg:
        opts = entry.options
        if isinstance(opts, GFPGANOptions) and opts.bg_upsampler is not None:
            bg = reg.entries.get(opts.bg_upsampler)
            if bg is None or bg.family != "esrgan":
                raise ModelConfigError(
                    f"model {entry.id!r}: bg_upsampler {opts.bg_upsampler!r} is not an esrgan entry"
                )
    return reg


def registry_path(path: str | Path | None = None) -> Path:
    """The registry file: ``path`` or ``$TOLLGATE_MODELS``."""
    if path is None:
        env = os.environ.get(ENV_REGISTRY)
        if not env:
            raise ModelConfigError(f"no registry given and ${ENV_REGISTRY} is not set")
        path = env
    return Path(path).expanduser()


def load_registry(path: str | Path | None = None, *, check_files: bool = True) -> Registry:
    """Read and validate a registry file.

    With ``check_files`` (the default) every referenced file must exist, else
    :class:`ModelFileMissing` names the first missing one and where it belongs.
    """
    p = registry_path(path)
    if not p.is_file():
        raise ModelFileMissing(
            p, f"model registry (TOML); set ${ENV_REGISTRY} or run `tollgate models make-tiny DIR`"
        )
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ModelConfigError(f"{p}: invalid TOML: {exc}") from exc
    reg = parse_registry(data, p.resolve().parent, source=p)
    if check_files:
        reg.check_files()
    return reg
