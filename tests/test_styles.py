"""The tune style catalogue: the shipped file, each validation rule, picking a tune's styles,
prompt formatting, and GET /v1/styles (real PostgreSQL for authentication)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from billing import InvalidJobSpec
from billing.pricing import TUNE_RENDER_PROMPTS, TUNE_RENDER_STEPS_MAX
from orchestrator.accounts import create_account
from orchestrator.api.app import create_app
from orchestrator.errors import OrchestratorError
from orchestrator.jobs import styles
from orchestrator.jobs.styles import (
    Catalogue,
    InvalidCatalogue,
    Style,
    UnknownStyle,
    get_catalogue,
    load_catalogue,
    pick_styles,
)

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def shipped() -> Doc:
    doc: Doc = json.loads(styles.DEFAULT_PATH.read_text(encoding="utf-8"))
    return doc


@pytest.fixture
def write(tmp_path: Path) -> Callable[[Any], Path]:
    def _write(doc: Any) -> Path:
        path = tmp_path / "styles.json"
        path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc, encoding="utf-8")
        return path

    return _write


# --- the shipped catalogue ----------------------------------------------------------------


def test_shipped_catalogue_loads_with_at_least_100_styles() -> None:
    catalogue = load_catalogue()
    assert len(catalogue) >= 100
    assert len(set(catalogue.ids)) == len(catalogue)
    assert get_catalogue() is get_catalogue()
    assert get_catalogue().ids == catalogue.ids
    for style in catalogue:
        assert style.template.count("{subject}") == 1
        assert 1 <= style.steps <= TUNE_RENDER_STEPS_MAX
        assert 1 <= style.guidance <= 20
        assert style.name and style.tags
    for wanted in ("studio-portrait", "oil-painting", "cyberpunk-neon", "pet-royal-portrait"):
        assert wanted in catalogue


def test_shipped_catalogue_is_package_data() -> None:
    assert Path(styles.__file__).parents[1] / "data" / "styles.json" == styles.DEFAULT_PATH
    assert styles.DEFAULT_PATH.is_file()


def test_defaults_are_8_distinct_known_and_deterministic() -> None:
    catalogue = load_catalogue()
    defaults = catalogue.default_ids(8)
    assert len(defaults) == len(set(defaults)) == 8
    assert all(d in catalogue for d in defaults)
    assert defaults == load_catalogue().default_ids() == catalogue.default_ids(8)
    assert catalogue.default_ids(3) == defaults[:3]
    assert len(catalogue.default_ids(len(catalogue))) == len(catalogue)
    with pytest.raises(ValueError):
        catalogue.default_ids(0)


def test_get_and_unknown_style() -> None:
    catalogue = load_catalogue()
    assert catalogue.get("watercolor").name == "Watercolor"
    with pytest.raises(UnknownStyle, match="'no-such-style'") as info:
        catalogue.get("no-such-style")
    assert isinstance(info.value, OrchestratorError)
    assert info.value.style_id == "no-such-style"


def test_style_is_frozen() -> None:
    style = load_catalogue().get("watercolor")
    with pytest.raises(AttributeError):
        style.steps = 10  # type: ignore[misc]


# --- validation: each rule rejects a bad file, naming the style ---------------------------


def _with_style(doc: Doc, index: int, **changes: Any) -> Doc:
    bad = copy.deepcopy(doc)
    for key, value in changes.items():
        if value is _DROP:
            del bad["styles"][index][key]
        else:
            bad["styles"][index][key] = value
    return bad


_DROP = object()

BAD_STYLES: list[tuple[str, dict[str, Any], str]] = [
    ("no placeholder", {"template": "a photo of a person"}, r"\{subject\} exactly once"),
    ("two placeholders", {"template": "{subject} and {subject}"}, r"exactly once, found 2"),
    ("other braces", {"template": "a photo of {subject} in {place}"}, "no braces other"),
    ("stray brace", {"template": "a photo of {subject} }"}, "no braces other"),
    ("template not str", {"template": 5}, "template must be a string"),
    ("empty name", {"name": "  "}, "name must not be empty"),
    ("name not str", {"name": None}, "name must be a string"),
    ("negative not str", {"negative_prompt": ["x"]}, "negative_prompt must be a string"),
    ("steps zero", {"steps": 0}, r"steps must be 1\.\.50"),
    ("steps over 50", {"steps": 51}, r"steps must be 1\.\.50"),
    ("steps float", {"steps": 30.0}, "steps must be an integer"),
    ("steps bool", {"steps": True}, "steps must be an integer"),
    ("guidance low", {"guidance": 0.5}, r"guidance must be 1\.\.20"),
    ("guidance high", {"guidance": 20.5}, r"guidance must be 1\.\.20"),
    ("guidance str", {"guidance": "7"}, "guidance must be a number"),
    ("missing steps", {"steps": _DROP}, "missing steps"),
    ("missing negative", {"negative_prompt": _DROP}, "missing negative_prompt"),
    ("unknown key", {"negative": "x"}, "unknown key"),
    ("tags not list", {"tags": "photo"}, "tags must be a list"),
    ("tag not kebab", {"tags": ["Photo"]}, "tags must be a list"),
    ("repeated tag", {"tags": ["photo", "photo"]}, "tags must not repeat"),
]


@pytest.mark.parametrize(
    ("changes", "message"), [b[1:] for b in BAD_STYLES], ids=[b[0] for b in BAD_STYLES]
)
def test_bad_style_is_rejected_naming_its_id(
    shipped: Doc, write: Callable[[Any], Path], changes: dict[str, Any], message: str
) -> None:
    victim = shipped["styles"][7]["id"]
    with pytest.raises(InvalidCatalogue, match=message) as info:
        load_catalogue(write(_with_style(shipped, 7, **changes)))
    assert victim in str(info.value)
    assert info.value.style_id == victim
    assert isinstance(info.value, OrchestratorError)


def test_duplicate_id_is_rejected_naming_it(shipped: Doc, write: Callable[[Any], Path]) -> None:
    first = shipped["styles"][0]["id"]
    bad = _with_style(shipped, 12, id=first)
    with pytest.raises(InvalidCatalogue, match=f"style '{first}': duplicate id"):
        load_catalogue(write(bad))


@pytest.mark.parametrize("bad_id", ["Studio-Portrait", "oil_painting", "-x", "a--b", "", 7])
def test_non_kebab_id_is_rejected(shipped: Doc, write: Callable[[Any], Path], bad_id: Any) -> None:
    with pytest.raises(InvalidCatalogue, match=r"styles\[3\]: id must be lowercase-kebab") as info:
        load_catalogue(write(_with_style(shipped, 3, id=bad_id)))
    assert repr(bad_id) in str(info.value)


def test_too_few_styles_is_rejected(shipped: Doc, write: Callable[[Any], Path]) -> None:
    bad = copy.deepcopy(shipped)
    bad["styles"] = bad["styles"][:99]
    bad["defaults"] = [s["id"] for s in bad["styles"][:8]]
    with pytest.raises(InvalidCatalogue, match="at least 100 styles, has 99"):
        load_catalogue(write(bad))
    bad["styles"] = shipped["styles"][:100]
    assert len(load_catalogue(write(bad))) == 100


def test_bad_defaults_are_rejected(shipped: Doc, write: Callable[[Any], Path]) -> None:
    bad = copy.deepcopy(shipped)
    bad["defaults"] = [*shipped["defaults"][:7], "no-such-style"]
    with pytest.raises(InvalidCatalogue, match="'no-such-style': listed in defaults but not"):
        load_catalogue(write(bad))
    bad["defaults"] = [*shipped["defaults"][:7], shipped["defaults"][0]]
    with pytest.raises(InvalidCatalogue, match="listed twice in defaults"):
        load_catalogue(write(bad))
    bad["defaults"] = shipped["defaults"][:7]
    with pytest.raises(InvalidCatalogue, match="at least 8"):
        load_catalogue(write(bad))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{not json", "not valid JSON"),
        ([], "must be a JSON object"),
        ({"version": 2, "defaults": [], "styles": []}, "version must be 1"),
        ({"version": 1, "defaults": [], "styles": {}}, "styles must be a list"),
        ({"version": 1, "defaults": [], "styles": [], "extra": 1}, "unknown top-level"),
        ({"version": 1, "defaults": [], "styles": ["x"]}, r"styles\[0\] must be an object"),
    ],
)
def test_bad_file_is_rejected(write: Callable[[Any], Path], doc: Any, message: str) -> None:
    with pytest.raises(InvalidCatalogue, match=message):
        load_catalogue(write(doc))


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidCatalogue, match="cannot read"):
        load_catalogue(tmp_path / "nope.json")


# --- picking a tune's styles --------------------------------------------------------------


def test_pick_styles_none_gives_the_defaults() -> None:
    catalogue = load_catalogue()
    picked = pick_styles(catalogue, None)
    assert [s.id for s in picked] == catalogue.default_ids(8)
    assert all(isinstance(s, Style) for s in picked)


def test_pick_styles_keeps_the_callers_order() -> None:
    catalogue = load_catalogue()
    ids = list(reversed(catalogue.ids[-TUNE_RENDER_PROMPTS:]))
    assert [s.id for s in pick_styles(catalogue, ids)] == ids
    assert [s.id for s in pick_styles(catalogue, tuple(ids))] == ids


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda ids: ids[:7], "exactly 8 style ids, got 7"),
        (lambda ids: [*ids, "watercolor"], "exactly 8 style ids, got 9"),
        (lambda ids: [], "exactly 8 style ids, got 0"),
        (lambda ids: [*ids[:7], ids[0]], "duplicate style id"),
        (lambda ids: [*ids[:7], "no-such-style"], "unknown style id 'no-such-style'"),
        (lambda ids: [*ids[:7], 3], r"styles\[7\] must be a string"),
        (lambda ids: "watercolor", "must be a list of 8 style ids"),
        (lambda ids: {"a": 1}, "must be a list of 8 style ids"),
    ],
)
def test_pick_styles_rejects_naming_the_field(
    make: Callable[[list[str]], Any], message: str
) -> None:
    catalogue = load_catalogue()
    ids = list(catalogue.ids[:8])
    with pytest.raises(InvalidJobSpec, match=message) as info:
        pick_styles(catalogue, make(ids))
    assert info.value.field == "styles"
    assert str(info.value).startswith("styles: ")


# --- prompts ------------------------------------------------------------------------------


def test_prompt_puts_token_and_subject_word_into_the_template() -> None:
    style = Style("t", "T", "a portrait photo of {subject}, studio lighting, 85mm", "", 30, 7.0)
    assert style.prompt("sks", "man") == "a portrait photo of sks man, studio lighting, 85mm"
    assert style.prompt(" sks ", " golden   retriever ") == (
        "a portrait photo of sks golden retriever, studio lighting, 85mm"
    )
    assert style.prompt("{x}", "dog").startswith("a portrait photo of {x} dog")


def test_prompt_rejects_bad_token_or_subject() -> None:
    style = load_catalogue().get("studio-portrait")
    for token, word in [("", "man"), ("sks tok", "man"), ("sks", " ")]:
        with pytest.raises(ValueError):
            style.prompt(token, word)


def test_every_shipped_style_formats_a_prompt() -> None:
    for style in load_catalogue():
        prompt = style.prompt("sks", "woman")
        assert "sks woman" in prompt and "{" not in prompt and "}" not in prompt


def test_catalogue_as_dict_round_trips() -> None:
    catalogue = load_catalogue()
    again = styles.parse_catalogue(
        {
            "version": 1,
            "defaults": list(catalogue.defaults),
            "styles": [s.as_dict() for s in catalogue],
        }
    )
    assert again == Catalogue(catalogue.styles, catalogue.defaults)


# --- GET /v1/styles -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(settings_env: None, pg_engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def headers(pg_engine: Engine) -> dict[str, str]:
    account = create_account(pg_engine, "styles-test", "free")
    return {"Authorization": f"Bearer {account.api_key}"}


def test_styles_route_needs_an_api_key(client: TestClient) -> None:
    assert client.get("/v1/styles").status_code == 401
    bad = {"Authorization": "Bearer tg_nope"}
    assert client.get("/v1/styles", headers=bad).status_code == 401


def test_styles_route_lists_the_catalogue(client: TestClient, headers: dict[str, str]) -> None:
    res = client.get("/v1/styles", headers=headers)
    assert res.status_code == 200, res.text
    body = res.json()
    catalogue = get_catalogue()
    assert [s["id"] for s in body["styles"]] == list(catalogue.ids)
    assert body["default"] == catalogue.default_ids(8)
    first = body["styles"][0]
    assert set(first) == {"id", "name", "template", "negative_prompt", "steps", "guidance", "tags"}
    assert first == catalogue.styles[0].as_dict()


def test_styles_route_filters_by_tag(client: TestClient, headers: dict[str, str]) -> None:
    body = client.get("/v1/styles", params={"tag": "pets"}, headers=headers).json()
    assert body["styles"] and all("pets" in s["tags"] for s in body["styles"])
    assert {s["id"] for s in body["styles"]} == {s.id for s in get_catalogue().with_tag("pets")}
    assert body["default"] == get_catalogue().default_ids(8)
    none = client.get("/v1/styles", params={"tag": "no-such-tag"}, headers=headers).json()
    assert none["styles"] == []


def test_styles_route_is_documented(client: TestClient) -> None:
    assert "/v1/styles" in client.get("/openapi.json").json()["paths"]


def test_broken_catalogue_stops_the_api_starting(
    settings_env: None, write: Callable[[Any], Path], shipped: Doc, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = _with_style(shipped, 5, template="no placeholder here")
    monkeypatch.setattr(styles, "DEFAULT_PATH", write(broken))
    get_catalogue.cache_clear()
    try:
        with (
            pytest.raises(InvalidCatalogue, match=shipped["styles"][5]["id"]),
            TestClient(create_app()),
        ):
            pass
    finally:
        get_catalogue.cache_clear()
