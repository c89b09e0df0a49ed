"""Job spec validation and normalisation (pure). Errors name the field (HTTP 422)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, Final

from billing import InvalidJobSpec, Quote, quote

PROMPT_MAX_CHARS: Final = 2000
SEED_MAX: Final = 2**32 - 1
GUIDANCE_MAX: Final = 30.0
CALLBACK_URL_MAX_CHARS: Final = 2000
IMAGE_INPUT_TYPES: Final = frozenset({"upscale", "face_enhance", "remove_background"})
SUBMITTABLE_TYPES: Final = ("txt2img", "upscale", "face_enhance", "remove_background")


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
    if job_type == "txt2img":
        _opt_str(spec, "prompt", PROMPT_MAX_CHARS, required=True)
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
    return out, price


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
    return int(spec.get("num_images", 1)) if spec["type"] == "txt2img" else 1
