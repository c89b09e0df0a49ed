"""Pricing: the seed's table cell by cell, orientation, non-row sizes and every rejection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from billing import InvalidJobSpec, quote

# (width, height) -> prices for steps <= 50, 51-100, 101-150. From shared/seed.
SEED_TABLE = {
    (512, 512): (1, 2, 4),
    (512, 768): (1, 2, 4),
    (512, 1024): (1, 2, 6),
    (768, 768): (1, 2, 6),
    (768, 1024): (1, 2, 8),
    (1024, 1024): (2, 4, 10),
}
BAND_STEPS = (50, 100, 150)
CELLS = [
    (w, h, steps, prices[i])
    for (w, h), prices in SEED_TABLE.items()
    for i, steps in enumerate(BAND_STEPS)
]


def txt2img(**fields: object) -> dict[str, object]:
    return {"type": "txt2img", "prompt": "a cat", **fields}


@pytest.mark.parametrize(("width", "height", "steps", "credits"), CELLS)
def test_table_cell(width: int, height: int, steps: int, credits: int) -> None:
    assert len(CELLS) == 18
    q = quote(txt2img(width=width, height=height, steps=steps, num_images=1))
    assert (q.credits, q.credit_kind) == (credits, "image")


@pytest.mark.parametrize(("steps", "band"), [(1, 0), (50, 0), (51, 1), (100, 1), (101, 2)])
def test_band_edges(steps: int, band: int) -> None:
    assert quote(txt2img(width=1024, height=1024, steps=steps)).credits == (2, 4, 10)[band]


def test_orientation_does_not_matter() -> None:
    for (w, h), _ in SEED_TABLE.items():
        for steps in BAND_STEPS:
            assert (
                quote(txt2img(width=h, height=w, steps=steps)).credits
                == quote(txt2img(width=w, height=h, steps=steps)).credits
            )
    assert quote(txt2img(width=1024, height=768, steps=120)).breakdown["row"] == "768x1024"


@pytest.mark.parametrize(
    ("width", "height", "row"),
    [
        (640, 640, "768x768"),
        (896, 896, "1024x1024"),
        (384, 512, "512x512"),
        (256, 256, "512x512"),
        (256, 1024, "512x1024"),
        (520, 520, "768x768"),
        (640, 1024, "768x1024"),
        (776, 1024, "1024x1024"),
        (512, 776, "512x1024"),
    ],
)
def test_non_row_sizes_price_as_smallest_covering_row(width: int, height: int, row: str) -> None:
    assert quote(txt2img(width=width, height=height, steps=20)).breakdown["row"] == row


def test_num_images_multiplies() -> None:
    q = quote(txt2img(width=768, height=1024, steps=120, num_images=8))
    assert q.credits == 64
    assert q.breakdown == {
        "row": "768x1024",
        "step_band": "101-150",
        "per_image": 8,
        "num_images": 8,
    }


def test_other_tools() -> None:
    assert quote({"type": "upscale", "scale": 2}).as_dict()["credits"] == 1
    assert quote({"type": "upscale", "scale": 4}).credits == 2
    assert quote({"type": "face_enhance"}).credits == 1
    assert quote({"type": "remove_background"}).credits == 1
    for t in ("upscale", "face_enhance", "remove_background"):
        assert quote({"type": t}).credit_kind == "image"


def test_tune_and_tune_prompt() -> None:
    q = quote({"type": "tune", "name": "me"})
    assert (q.credits, q.credit_kind) == (1, "tune")
    assert (q.extra_credits, q.extra_credit_kind) == (64, "tune_image")
    assert q.breakdown["render"]["prompts"] * q.breakdown["render"]["images_per_prompt"] == 64
    later = quote(
        {"type": "tune_prompt", "width": 1024, "height": 1024, "steps": 60, "num_images": 2}
    )
    assert (later.credits, later.credit_kind) == (8, "tune_image")


@pytest.mark.parametrize(
    ("spec", "field", "fragment"),
    [
        (txt2img(width=1032), "width", "256..1024"),
        (txt2img(width=248), "width", "256..1024"),
        (txt2img(height=500), "height", "multiple of 8"),
        (txt2img(steps=0), "steps", "1..150"),
        (txt2img(steps=151), "steps", "1..150"),
        (txt2img(num_images=0), "num_images", "1..8"),
        (txt2img(num_images=9), "num_images", "1..8"),
        (txt2img(steps="30"), "steps", "integer"),
        (txt2img(steps=30.0), "steps", "integer"),
        (txt2img(width=True), "width", "integer"),
        ({"type": "upscale", "scale": 3}, "scale", "[2, 4]"),
        ({"type": "paint"}, "type", "txt2img"),
        ({}, "type", "must be one of"),
    ],
)
def test_rejections_name_field_and_range(
    spec: dict[str, object], field: str, fragment: str
) -> None:
    with pytest.raises(InvalidJobSpec) as info:
        quote(spec)
    assert info.value.field == field
    assert fragment in str(info.value)


def test_quote_cli_prints_json_and_exits_2_on_bad_input() -> None:
    spec = txt2img(width=512, height=768, steps=30, num_images=4)
    ok = subprocess.run(
        [sys.executable, "-m", "orchestrator", "quote", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {
        "credits": 4,
        "credit_kind": "image",
        "breakdown": {"row": "512x768", "step_band": "<=50", "per_image": 1, "num_images": 4},
    }
    bad = subprocess.run(
        [sys.executable, "-m", "orchestrator", "quote", '{"type": "txt2img", "steps": 200}'],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "steps" in bad.stderr and "1..150" in bad.stderr
    garbage = subprocess.run(
        [sys.executable, "-m", "orchestrator", "quote", "{nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert garbage.returncode == 2 and "not valid JSON" in garbage.stderr


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (txt2img(num_image=4), "num_image"),
        ({"type": "face_enhance", "scale": 2}, "scale"),
        ({"type": "tune", "name": "me", "training": {"steps": 30, "lr": 1}}, "training.lr"),
        (txt2img(prompt="a\x00b"), "prompt"),
    ],
)
def test_unknown_fields_and_nul_are_refused_naming_the_field(
    spec: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidJobSpec) as err:
        quote(spec)
    assert err.value.field == field


def test_quote_and_submit_clis_refuse_an_unknown_field() -> None:
    spec = json.dumps(txt2img(num_image=4))
    for args in (["quote", spec], ["submit", spec, "--account", "acc_x", "--via", "redis"]):
        env = {**os.environ, "TOLLGATE_REDIS_URL": "redis://127.0.0.1:1/0"}  # never reached
        out = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        assert out.returncode == 2, (args, out.stderr)
        assert "num_image" in out.stderr and "unknown field" in out.stderr
