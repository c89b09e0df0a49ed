"""Job spec validation and normalisation (pure). Errors name the field (HTTP 422)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, Final

from billing import InvalidJobSpec, Quote, quote

PROMPT_MAX_CHARS: Final = 2000
MODEL_ID_MAX_CHARS: Final = 100
SEED_MAX: Final = 2**32 - 1
GUIDANCE_MAX: Final = 30.0
CALLBACK_URL_MAX_CHARS: Final = 2000
IMAGE_INPUT_TYPES: Final = frozenset({"upscale", "face_enhance", "remove_background"})
SUBMITTABLE_TYPES: Final = (
    "txt2img",
    "upscale",
    "face_enhance",
    "remove_background",
    "tune",
    "tune_prompt",
)
TUNE_IMAGES_MIN: Final = 4
TUNE_IMAGES_MAX: Final = 20
TUNE_NAME_MAX_CHARS: Final = 100
TUNE_SUBJECTS: Final = (
    "man",
    "woman",
    "person",
    "boy",
    "girl",
    "baby",
    "dog",
    "cat",
    "pet",
    "object",
    "product",
    "style",
)
TUNE_BASE_MODELS: Final = ("sd15", "sdxl")
# (default, lo, hi) of each training knob.
TUNE_TRAINING_BOUNDS: Final[dict[str, tuple[float, float, float]]] = {
    "steps": (400, 1, 3000),
    "rank": (4, 1, 64),
    "learning_rate": (1e-4, 1e-6, 1e-2),
}


def _opt_str(spec: Mapping[str, Any], name: str, max_chars: int, required: bool = False) -> None:
    value = spec.get(name)
    if value is None and not required:
        return
    if not isinstance(value, str) or not value.strip() or len(value) > max_chars:
        raise InvalidJobSpec(name, f"must be a non-empty string of at most {max_chars} characters")


def validate(spec: Any) -> tuple[dict[str, Any], Quote]:
    """Check a submitted spec and fill in defaults (size, steps, count, seed), so that the
    stored spec reproduces the job exactly. Returns the normalised spec and its price."""
    if not isinstance(spec, Mapping):
        raise InvalidJobSpec("spec", "must be a JSON object")
    price = quote(spec)  # checks type, size, steps, num_images, scale
    job_type = spec["type"]
    if job_type not in SUBMITTABLE_TYPES:
        raise InvalidJobSpec(
            "type",
            f"{job_type!r} jobs cannot be submitted yet; "
            f"submittable: {', '.join(SUBMITTABLE_TYPES)}",
        )
    out = dict(spec)
    if job_type == "tune_prompt":
        if not isinstance(spec.get("tune_id"), str):
            raise InvalidJobSpec("tune_id", "must be a tune's id")
        if (spec.get("style") is None) == (spec.get("prompt") is None):
            raise InvalidJobSpec("prompt", "give exactly one of style or prompt")
        _opt_str(spec, "style", 100)
    if job_type in ("txt2img", "tune_prompt"):
        _opt_str(spec, "prompt", PROMPT_MAX_CHARS, required=job_type == "txt2img")
        _opt_str(spec, "negative_prompt", PROMPT_MAX_CHARS)
        out.setdefault("width", 512)
        out.setdefault("height", 512)
        out.setdefault("steps", 30)
        out.setdefault("num_images", 1)
        guidance = spec.get("guidance", 7.5)
        if (
            isinstance(guidance, bool)
            or not isinstance(guidance, int | float)
            or not (0 <= guidance <= GUIDANCE_MAX)
        ):
            raise InvalidJobSpec("guidance", f"must be a number in 0..{GUIDANCE_MAX:g}")
        out["guidance"] = guidance
        seed = spec.get("seed")
        if seed is None:
            seed = secrets.randbelow(SEED_MAX - 8)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX - 8:
            raise InvalidJobSpec("seed", f"must be an integer in 0..{SEED_MAX - 8}")
        out["seed"] = seed
    _opt_str(spec, "model", MODEL_ID_MAX_CHARS)  # a registry id (workers: default per family)
    if not isinstance(spec.get("alpha_matting", False), bool):
        raise InvalidJobSpec("alpha_matting", "must be true or false")
    if job_type in IMAGE_INPUT_TYPES:
        has_id, has_b64 = spec.get("image_id") is not None, spec.get("image_b64") is not None
        if has_id == has_b64:
            raise InvalidJobSpec("image_id", "give exactly one of image_id or image_b64")
        if has_id and not isinstance(spec["image_id"], str):
            raise InvalidJobSpec("image_id", "must be a string")
        if has_b64 and not isinstance(spec["image_b64"], str):
            raise InvalidJobSpec("image_b64", "must be a base64 string")
    if job_type == "upscale":
        out.setdefault("scale", 4)
    if job_type == "tune":
        out.update(_tune_fields(spec))
    return out, price


def _tune_fields(spec: Mapping[str, Any]) -> dict[str, Any]:
    from orchestrator.jobs.styles import get_catalogue, pick_styles

    _opt_str(spec, "name", TUNE_NAME_MAX_CHARS, required=True)
    if spec.get("subject") not in TUNE_SUBJECTS:
        raise InvalidJobSpec("subject", f"must be one of {', '.join(TUNE_SUBJECTS)}")
    ids, inline = spec.get("image_ids"), spec.get("images_b64")
    if (ids is None) == (inline is None):
        raise InvalidJobSpec("image_ids", "give exactly one of image_ids or images_b64")
    field, images = ("image_ids", ids) if ids is not None else ("images_b64", inline)
    if (
        not isinstance(images, list)
        or not TUNE_IMAGES_MIN <= len(images) <= TUNE_IMAGES_MAX
        or not all(isinstance(i, str) for i in images)
    ):
        raise InvalidJobSpec(
            field, f"must be a list of {TUNE_IMAGES_MIN}..{TUNE_IMAGES_MAX} strings"
        )
    base_model = spec.get("base_model", "sd15")
    if base_model not in TUNE_BASE_MODELS:
        raise InvalidJobSpec("base_model", f"must be one of {', '.join(TUNE_BASE_MODELS)}")
    styles = [s.id for s in pick_styles(get_catalogue(), spec.get("styles"))]
    training = spec.get("training") or {}
    if not isinstance(training, Mapping):
        raise InvalidJobSpec("training", "must be an object")
    # Unknown training options are refused by billing.check_fields (via quote) already.
    knobs: dict[str, Any] = {}
    for name, (default, lo, hi) in TUNE_TRAINING_BOUNDS.items():
        value = training.get(name, default)
        integral = name != "learning_rate"
        ok_type = isinstance(value, int) if integral else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
            kind = "an integer" if integral else "a number"
            raise InvalidJobSpec(f"training.{name}", f"must be {kind} in {lo:g}..{hi:g}")
        knobs[name] = value
    return {"base_model": base_model, "styles": styles, "training": knobs}


def validate_callback_url(url: Any) -> str | None:
    if url is None:
        return None
    if (
        not isinstance(url, str)
        or len(url) > CALLBACK_URL_MAX_CHARS
        or not url.startswith(("http://", "https://"))
    ):
        raise InvalidJobSpec(
            "callback_url", f"must be an http(s) URL of at most {CALLBACK_URL_MAX_CHARS} characters"
        )
    return url


def outputs_expected(spec: Mapping[str, Any]) -> int:
    if spec["type"] == "tune":
        return 64
    return int(spec.get("num_images", 1)) if spec["type"] in ("txt2img", "tune_prompt") else 1
