"""Pricing: pure functions from a job spec to credits. Integers only, no I/O.

The table is the product's credit page (shared/seed): price per image by resolution row
and step band. Sizes that are not a row price as the smallest row (by area, in table order)
that covers both the short and the long side. Orientation does not matter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from billing.errors import InvalidJobSpec

CREDIT_KINDS: Final = ("image", "tune", "tune_image")
JOB_TYPES: Final = (
    "txt2img",
    "upscale",
    "face_enhance",
    "remove_background",
    "tune",
    "tune_prompt",
)

SIDE_MIN_PX: Final = 256
SIDE_MAX_PX: Final = 1024
SIDE_MULTIPLE_PX: Final = 8
STEPS_MIN: Final = 1
STEPS_MAX: Final = 150
NUM_IMAGES_MIN: Final = 1
NUM_IMAGES_MAX: Final = 8

# Step bands: (upper bound inclusive, label). Column order of the table.
STEP_BANDS: Final = ((50, "<=50"), (100, "51-100"), (150, "101-150"))

# (short side, long side) -> per-image credits per step band. Ordered by area.
PRICE_TABLE: Final[tuple[tuple[tuple[int, int], tuple[int, int, int]], ...]] = (
    ((512, 512), (1, 2, 4)),
    ((512, 768), (1, 2, 4)),
    ((512, 1024), (1, 2, 6)),
    ((768, 768), (1, 2, 6)),
    ((768, 1024), (1, 2, 8)),
    ((1024, 1024), (2, 4, 10)),
)

UPSCALE_PRICES: Final = {2: 1, 4: 2}
FACE_ENHANCE_PRICE: Final = 1
REMOVE_BACKGROUND_PRICE: Final = 1
TUNE_TRAIN_PRICE: Final = 1
TUNE_RENDER_PROMPTS: Final = 8
TUNE_RENDER_IMAGES_PER_PROMPT: Final = 8
TUNE_RENDER_SIZE: Final = (512, 512)
TUNE_RENDER_STEPS_MAX: Final = 50

# The fields each job type takes. Anything else is refused (a typo such as `num_image`
# would otherwise run, and be charged, as the default): one check for every way in.
_IMAGE_FIELDS: Final = frozenset(
    {"prompt", "negative_prompt", "width", "height", "steps", "num_images", "guidance", "seed"}
)
_INPUT_FIELDS: Final = frozenset({"image_id", "image_b64"})
SPEC_FIELDS: Final[dict[str, frozenset[str]]] = {
    "txt2img": _IMAGE_FIELDS | {"model"},
    "tune_prompt": _IMAGE_FIELDS | {"tune_id", "style"},
    "upscale": _INPUT_FIELDS | {"scale", "model"},
    "face_enhance": _INPUT_FIELDS | {"model"},
    "remove_background": _INPUT_FIELDS | {"model", "alpha_matting"},
    "tune": frozenset(
        {"name", "subject", "image_ids", "images_b64", "base_model", "styles", "training"}
    ),
}
# Nested objects and the keys they take.
SPEC_NESTED_FIELDS: Final[dict[tuple[str, str], frozenset[str]]] = {
    ("tune", "training"): frozenset({"steps", "rank", "learning_rate"}),
}

# Defaults for image fields a quote may leave out.
DEFAULT_SIDE_PX: Final = 512
DEFAULT_STEPS: Final = 30
DEFAULT_NUM_IMAGES: Final = 1


@dataclass(frozen=True)
class Quote:
    credits: int
    credit_kind: str
    breakdown: dict[str, Any] = field(default_factory=dict)
    # A second, optional hold (a tune's 64-image render in tune_image credits).
    extra_credits: int = 0
    extra_credit_kind: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "credits": self.credits,
            "credit_kind": self.credit_kind,
            "breakdown": self.breakdown,
        }


def _int_field(spec: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = spec.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidJobSpec(name, f"must be an integer in {lo}..{hi}, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidJobSpec(name, f"must be in {lo}..{hi}, got {value}")
    return value


def _side(spec: Mapping[str, Any], name: str) -> int:
    value = _int_field(spec, name, DEFAULT_SIDE_PX, SIDE_MIN_PX, SIDE_MAX_PX)
    if value % SIDE_MULTIPLE_PX:
        raise InvalidJobSpec(
            name,
            f"must be a multiple of {SIDE_MULTIPLE_PX} in {SIDE_MIN_PX}..{SIDE_MAX_PX}, "
            f"got {value}",
        )
    return value


def price_row(width: int, height: int) -> tuple[int, int]:
    """The table row (short, long) that prices a width x height image."""
    short, long = sorted((width, height))
    for row, _prices in PRICE_TABLE:
        if row[0] >= short and row[1] >= long:
            return row
    raise InvalidJobSpec("width", f"{width}x{height} exceeds {SIDE_MAX_PX}x{SIDE_MAX_PX}")


def step_band(steps: int) -> int:
    """Index of the step band (column) for `steps`."""
    for index, (upper, _label) in enumerate(STEP_BANDS):
        if steps <= upper:
            return index
    raise InvalidJobSpec("steps", f"must be in {STEPS_MIN}..{STEPS_MAX}, got {steps}")


def per_image_credits(width: int, height: int, steps: int) -> int:
    row = price_row(width, height)
    prices = dict(PRICE_TABLE)[row]
    return prices[step_band(steps)]


def _image_quote(spec: Mapping[str, Any], credit_kind: str) -> Quote:
    width = _side(spec, "width")
    height = _side(spec, "height")
    steps = _int_field(spec, "steps", DEFAULT_STEPS, STEPS_MIN, STEPS_MAX)
    num_images = _int_field(spec, "num_images", DEFAULT_NUM_IMAGES, NUM_IMAGES_MIN, NUM_IMAGES_MAX)
    row = price_row(width, height)
    per_image = per_image_credits(width, height, steps)
    breakdown = {
        "row": f"{row[0]}x{row[1]}",
        "step_band": STEP_BANDS[step_band(steps)][1],
        "per_image": per_image,
        "num_images": num_images,
    }
    return Quote(per_image * num_images, credit_kind, breakdown)


def _upscale_quote(spec: Mapping[str, Any]) -> Quote:
    scale = spec.get("scale", 4)
    if isinstance(scale, bool) or scale not in UPSCALE_PRICES:
        raise InvalidJobSpec("scale", f"must be one of {sorted(UPSCALE_PRICES)}, got {scale!r}")
    credits = UPSCALE_PRICES[scale]
    return Quote(credits, "image", {"scale": scale, "per_image": credits, "num_images": 1})


def _tune_quote() -> Quote:
    render_credits = TUNE_RENDER_PROMPTS * TUNE_RENDER_IMAGES_PER_PROMPT
    per_image = per_image_credits(*TUNE_RENDER_SIZE, TUNE_RENDER_STEPS_MAX)
    breakdown = {
        "train": {"credits": TUNE_TRAIN_PRICE, "credit_kind": "tune"},
        "render": {
            "credits": render_credits * per_image,
            "credit_kind": "tune_image",
            "prompts": TUNE_RENDER_PROMPTS,
            "images_per_prompt": TUNE_RENDER_IMAGES_PER_PROMPT,
            "size": f"{TUNE_RENDER_SIZE[0]}x{TUNE_RENDER_SIZE[1]}",
            "per_image": per_image,
        },
    }
    return Quote(
        TUNE_TRAIN_PRICE,
        "tune",
        breakdown,
        extra_credits=render_credits * per_image,
        extra_credit_kind="tune_image",
    )


SPEC_DEPTH_MAX: Final = 8


def _check_text(value: Any, path: str, depth: int = 0) -> None:
    """NUL characters anywhere (keys included) and nesting past SPEC_DEPTH_MAX are refused:
    PostgreSQL's text and jsonb cannot store NUL."""
    if depth > SPEC_DEPTH_MAX:
        raise InvalidJobSpec(path, f"nested more than {SPEC_DEPTH_MAX} levels deep")
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidJobSpec(path, "must not contain NUL characters")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            name = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                raise InvalidJobSpec(path or "spec", "field names must not contain NUL")
            _check_text(item, name, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_text(item, path, depth + 1)


def check_fields(spec: Mapping[str, Any]) -> None:
    """Refuse a field the spec's type does not take (nested objects too), naming it, and
    NUL characters in any string."""
    _check_text(spec, "")
    job_type = spec.get("type")
    allowed = SPEC_FIELDS.get(job_type) if isinstance(job_type, str) else None
    if allowed is None:
        return  # the type itself is refused by quote()
    for name in sorted(spec, key=str):
        if name != "type" and name not in allowed:
            raise InvalidJobSpec(
                str(name),
                f"unknown field for a {job_type} job; allowed: {', '.join(sorted(allowed))}",
            )
    for (nested_type, parent), keys in SPEC_NESTED_FIELDS.items():
        value = spec.get(parent)
        if nested_type != job_type or not isinstance(value, Mapping):
            continue
        for name in sorted(value, key=str):
            if name not in keys:
                raise InvalidJobSpec(
                    f"{parent}.{name}", f"unknown field; allowed: {', '.join(sorted(keys))}"
                )


def quote(spec: Mapping[str, Any]) -> Quote:
    """Price a job spec, or raise InvalidJobSpec naming the field and the allowed range (or
    the unknown field)."""
    if not isinstance(spec, Mapping):
        raise InvalidJobSpec("spec", "must be a JSON object")
    check_fields(spec)
    job_type = spec.get("type")
    if job_type == "txt2img":
        return _image_quote(spec, "image")
    if job_type == "tune_prompt":
        return _image_quote(spec, "tune_image")
    if job_type == "upscale":
        return _upscale_quote(spec)
    if job_type == "face_enhance":
        return Quote(
            FACE_ENHANCE_PRICE, "image", {"per_image": FACE_ENHANCE_PRICE, "num_images": 1}
        )
    if job_type == "remove_background":
        return Quote(
            REMOVE_BACKGROUND_PRICE,
            "image",
            {"per_image": REMOVE_BACKGROUND_PRICE, "num_images": 1},
        )
    if job_type == "tune":
        return _tune_quote()
    raise InvalidJobSpec("type", f"must be one of {', '.join(JOB_TYPES)}, got {job_type!r}")
