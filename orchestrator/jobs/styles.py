"""The tune style catalogue: the styles a user picks for a tune's auto-render.

The catalogue ships as package data (orchestrator/data/styles.json) and is validated as a
whole when loaded, so a broken file stops the API at start-up instead of failing a tune
later. Each style's `template` holds `{subject}` exactly once; a tune renders it with the
subject "<token> <subject word>" (e.g. "sks man").

File format: {"version": 1, "defaults": [ids...], "styles": [{id, name, template,
negative_prompt, steps, guidance, tags?}, ...]}.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from billing import InvalidJobSpec
from billing.pricing import TUNE_RENDER_PROMPTS, TUNE_RENDER_STEPS_MAX
from orchestrator.errors import OrchestratorError

DEFAULT_PATH: Final = Path(__file__).parents[1] / "data" / "styles.json"
CATALOGUE_VERSION: Final = 1
STYLES_MIN: Final = 100
PLACEHOLDER: Final = "{subject}"
STEPS_MIN: Final = 1
STEPS_MAX: Final = TUNE_RENDER_STEPS_MAX  # the auto-render is priced at <= 50 steps
GUIDANCE_MIN: Final = 1.0
GUIDANCE_MAX: Final = 20.0
NAME_MAX: Final = 80
TEMPLATE_MAX: Final = 500
NEGATIVE_MAX: Final = 500
ID_PATTERN: Final = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
STYLE_KEYS: Final = frozenset(
    {"id", "name", "template", "negative_prompt", "steps", "guidance", "tags"}
)
REQUIRED_KEYS: Final = STYLE_KEYS - {"tags"}
FILE_KEYS: Final = frozenset({"version", "defaults", "styles"})


class InvalidCatalogue(OrchestratorError):
    """The style file is unusable. `style_id` names the offending style where there is one."""

    def __init__(self, problem: str, style_id: str | None = None) -> None:
        super().__init__(f"style {style_id!r}: {problem}" if style_id else problem)
        self.style_id = style_id
        self.problem = problem


class UnknownStyle(OrchestratorError):
    def __init__(self, style_id: str) -> None:
        super().__init__(f"unknown style {style_id!r}")
        self.style_id = style_id


@dataclass(frozen=True)
class Style:
    id: str
    name: str
    template: str
    negative_prompt: str
    steps: int
    guidance: float
    tags: tuple[str, ...] = ()

    def prompt(self, token: str, subject_word: str) -> str:
        """The template with `{subject}` = "<token> <subject word>" ("sks man")."""
        token, subject_word = token.strip(), " ".join(subject_word.split())
        if not token or any(c.isspace() for c in token):
            raise ValueError(f"token must be one non-empty word, got {token!r}")
        if not subject_word:
            raise ValueError("subject_word must not be empty")
        return self.template.replace(PLACEHOLDER, f"{token} {subject_word}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "template": self.template,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "guidance": self.guidance,
            "tags": list(self.tags),
        }


@dataclass(frozen=True)
class Catalogue:
    """Styles in file order; `defaults` is the curated pick when a tune names none."""

    styles: tuple[Style, ...]
    defaults: tuple[str, ...]
    _by_id: Mapping[str, Style] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {s.id: s for s in self.styles})

    def __len__(self) -> int:
        return len(self.styles)

    def __iter__(self) -> Iterator[Style]:
        return iter(self.styles)

    def __contains__(self, style_id: object) -> bool:
        return style_id in self._by_id

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.styles)

    def get(self, style_id: str) -> Style:
        try:
            return self._by_id[style_id]
        except (KeyError, TypeError):
            raise UnknownStyle(style_id) from None

    def with_tag(self, tag: str) -> list[Style]:
        return [s for s in self.styles if tag in s.tags]

    def default_ids(self, n: int = TUNE_RENDER_PROMPTS) -> list[str]:
        """The first n curated defaults (then further styles in file order); deterministic."""
        if not 1 <= n <= len(self.styles):
            raise ValueError(f"n must be 1..{len(self.styles)}, got {n}")
        rest = [s.id for s in self.styles if s.id not in self.defaults]
        return [*self.defaults, *rest][:n]


def _check_text(raw: Mapping[str, Any], key: str, style_id: str, limit: int) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise InvalidCatalogue(f"{key} must be a string, got {type(value).__name__}", style_id)
    if len(value) > limit:
        raise InvalidCatalogue(f"{key} is longer than {limit} characters", style_id)
    return value


def _parse_style(raw: Any, index: int) -> Style:
    if not isinstance(raw, dict):
        raise InvalidCatalogue(f"styles[{index}] must be an object")
    style_id = raw.get("id")
    if not isinstance(style_id, str) or not ID_PATTERN.fullmatch(style_id):
        raise InvalidCatalogue(
            f"styles[{index}]: id must be lowercase-kebab (a-z, 0-9, '-'), got {style_id!r}"
        )
    missing = sorted(REQUIRED_KEYS - raw.keys())
    if missing:
        raise InvalidCatalogue(f"missing {', '.join(missing)}", style_id)
    unknown = sorted(raw.keys() - STYLE_KEYS)
    if unknown:
        raise InvalidCatalogue(f"unknown key(s) {', '.join(unknown)}", style_id)

    name = _check_text(raw, "name", style_id, NAME_MAX)
    if not name.strip():
        raise InvalidCatalogue("name must not be empty", style_id)
    template = _check_text(raw, "template", style_id, TEMPLATE_MAX)
    if template.count(PLACEHOLDER) != 1:
        raise InvalidCatalogue(
            f"template must contain {PLACEHOLDER} exactly once, "
            f"found {template.count(PLACEHOLDER)}",
            style_id,
        )
    if "{" in template.replace(PLACEHOLDER, "") or "}" in template.replace(PLACEHOLDER, ""):
        raise InvalidCatalogue(f"template must have no braces other than {PLACEHOLDER}", style_id)
    negative = _check_text(raw, "negative_prompt", style_id, NEGATIVE_MAX)

    steps = raw["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise InvalidCatalogue(f"steps must be an integer, got {steps!r}", style_id)
    if not STEPS_MIN <= steps <= STEPS_MAX:
        raise InvalidCatalogue(f"steps must be {STEPS_MIN}..{STEPS_MAX}, got {steps}", style_id)
    guidance = raw["guidance"]
    if isinstance(guidance, bool) or not isinstance(guidance, int | float):
        raise InvalidCatalogue(f"guidance must be a number, got {guidance!r}", style_id)
    if not (math.isfinite(guidance) and GUIDANCE_MIN <= guidance <= GUIDANCE_MAX):
        raise InvalidCatalogue(
            f"guidance must be {GUIDANCE_MIN:g}..{GUIDANCE_MAX:g}, got {guidance}", style_id
        )

    tags = raw.get("tags", [])
    if not isinstance(tags, list) or not all(
        isinstance(t, str) and ID_PATTERN.fullmatch(t) for t in tags
    ):
        raise InvalidCatalogue("tags must be a list of lowercase-kebab strings", style_id)
    if len(set(tags)) != len(tags):
        raise InvalidCatalogue("tags must not repeat", style_id)

    return Style(style_id, name.strip(), template, negative, steps, float(guidance), tuple(tags))


def parse_catalogue(data: Any) -> Catalogue:
    """A validated catalogue from the decoded JSON document."""
    if not isinstance(data, dict):
        raise InvalidCatalogue("the catalogue must be a JSON object")
    unknown = sorted(data.keys() - FILE_KEYS)
    if unknown:
        raise InvalidCatalogue(f"unknown top-level key(s) {', '.join(unknown)}")
    if data.get("version") != CATALOGUE_VERSION:
        raise InvalidCatalogue(f"version must be {CATALOGUE_VERSION}, got {data.get('version')!r}")
    raw_styles = data.get("styles")
    if not isinstance(raw_styles, list):
        raise InvalidCatalogue("styles must be a list")

    styles: list[Style] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_styles):
        style = _parse_style(raw, index)
        if style.id in seen:
            raise InvalidCatalogue("duplicate id", style.id)
        seen.add(style.id)
        styles.append(style)
    if len(styles) < STYLES_MIN:
        raise InvalidCatalogue(
            f"the catalogue needs at least {STYLES_MIN} styles, has {len(styles)}"
        )

    defaults = data.get("defaults")
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise InvalidCatalogue("defaults must be a list of style ids")
    if len(defaults) < TUNE_RENDER_PROMPTS:
        raise InvalidCatalogue(
            f"defaults must list at least {TUNE_RENDER_PROMPTS} styles, has {len(defaults)}"
        )
    for index, style_id in enumerate(defaults):
        if style_id not in seen:
            raise InvalidCatalogue("listed in defaults but not defined", style_id)
        if style_id in defaults[:index]:
            raise InvalidCatalogue("listed twice in defaults", style_id)
    return Catalogue(tuple(styles), tuple(defaults))


def load_catalogue(path: str | Path | None = None) -> Catalogue:
    """Read and validate a catalogue file (the shipped one by default)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidCatalogue(f"cannot read {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidCatalogue(f"{path} is not valid JSON: {exc}") from exc
    return parse_catalogue(data)


@functools.cache
def get_catalogue() -> Catalogue:
    """The shipped catalogue, loaded and validated once per process."""
    return load_catalogue()


def pick_styles(catalogue: Catalogue, ids: Sequence[str] | None) -> list[Style]:
    """The styles of a tune's render: the defaults for None, else exactly 8 unique known ids
    (in the caller's order). Raises InvalidJobSpec with field "styles"."""
    if ids is None:
        return [catalogue.get(i) for i in catalogue.default_ids(TUNE_RENDER_PROMPTS)]
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
        raise InvalidJobSpec(
            "styles", f"must be a list of {TUNE_RENDER_PROMPTS} style ids, got {ids!r}"
        )
    if len(ids) != TUNE_RENDER_PROMPTS:
        raise InvalidJobSpec(
            "styles", f"must list exactly {TUNE_RENDER_PROMPTS} style ids, got {len(ids)}"
        )
    picked: list[Style] = []
    for index, style_id in enumerate(ids):
        if not isinstance(style_id, str):
            raise InvalidJobSpec("styles", f"styles[{index}] must be a string, got {style_id!r}")
        if style_id in ids[:index]:
            raise InvalidJobSpec("styles", f"duplicate style id {style_id!r}")
        if style_id not in catalogue:
            raise InvalidJobSpec("styles", f"unknown style id {style_id!r}")
        picked.append(catalogue.get(style_id))
    return picked
