"""What API fuzzing and hostile requests found (issue 12), each kept fixed: no 5xx for NUL
bytes, out-of-range integers, broken bodies; 413 for a chunked body over the bound; unknown
spec fields refused naming the field; every status documented with a model and an example;
/docs served from local assets; docs routes labelled in the request metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.limits import BODY_BYTES_MAX
from tests.api_helpers import ADMIN, TXT2IMG, Headers, image_balance


def test_out_of_range_ledger_cursor_is_a_422(user: tuple[str, Headers], client: TestClient) -> None:
    _, headers = user
    res = client.get("/v1/ledger", params={"before": 2**63}, headers=headers)
    assert res.status_code == 422 and res.json()["field"] == "before", res.text
    ok = client.get("/v1/ledger", params={"before": 2**63 - 1}, headers=headers)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    "path", ["/v1/jobs/job%00x", "/v1/tunes/t%00x", "/v1/jobs/job%00x/outputs/0"]
)
def test_nul_in_an_id_is_a_404(path: str, user: tuple[str, Headers], client: TestClient) -> None:
    res = client.get(path, headers=user[1])
    assert res.status_code == 404, res.text


def test_nul_in_admin_input(client: TestClient) -> None:
    res = client.post("/v1/accounts", json={"name": "a\u0000b"}, headers=ADMIN)
    assert res.status_code == 422 and res.json()["field"] == "name", res.text
    grant = {"kind": "image", "amount": 1, "reference": "r-nul"}
    res = client.post("/v1/accounts/a%00b/grants", json=grant, headers=ADMIN)
    assert res.status_code == 404, res.text
    res = client.post("/v1/accounts", json={"name": "ok", "plan": "free\u0000"}, headers=ADMIN)
    assert res.status_code == 422, res.text


def test_nul_in_a_job_spec_is_a_422_naming_the_field(
    user: tuple[str, Headers], client: TestClient
) -> None:
    _, headers = user
    spec = {**TXT2IMG, "prompt": "a\u0000b"}
    for path in ("/v1/quote", "/v1/jobs"):
        res = client.post(path, json=spec, headers=headers)
        assert res.status_code == 422 and res.json()["field"] == "prompt", res.text


def test_a_body_that_is_not_utf8_is_a_422_naming_the_problem(
    user: tuple[str, Headers], client: TestClient
) -> None:
    res = client.post(
        "/v1/jobs",
        content=b'{"spec": {"type": "txt2img", "prompt": "\xff\xfe"}}',
        headers={**user[1], "Content-Type": "application/json"},
    )
    assert res.status_code == 422, res.text
    assert res.json()["field"] == "body" and "UTF-8" in res.json()["detail"]


def test_a_chunked_body_over_the_bound_is_a_413(
    user: tuple[str, Headers], client: TestClient
) -> None:
    chunk = b" " * (1024 * 1024)

    def body() -> Iterator[bytes]:  # no Content-Length: sent chunked
        yield b'{"spec": {"type": "txt2img", "prompt": "x"}, "pad": "'
        for _ in range(BODY_BYTES_MAX // len(chunk) + 8):  # 40 MiB
            yield chunk
        yield b'"}'

    res = client.post(
        "/v1/jobs", content=body(), headers={**user[1], "Content-Type": "application/json"}
    )
    assert res.status_code == 413, res.text


def test_bad_multipart_upload_is_a_documented_422(
    user: tuple[str, Headers], client: TestClient
) -> None:
    res = client.post(
        "/v1/images",
        content=b"--nope\r\nnot a part",
        headers={**user[1], "Content-Type": "multipart/form-data; boundary=x"},
    )
    assert res.status_code == 422 and res.json()["field"] == "file", res.text
    res = client.post(
        "/v1/images",
        content=b"junk",
        headers={**user[1], "Content-Type": "multipart/form-data"},  # no boundary
    )
    assert res.status_code == 422, res.text


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({**TXT2IMG, "num_image": 4}, "num_image"),
        ({"type": "upscale", "scale": 2, "image_b64": "eA==", "sale": 4}, "sale"),
        (
            {
                "type": "tune",
                "name": "me",
                "subject": "dog",
                "image_ids": ["a", "b", "c", "d"],
                "training": {"steps": 30, "lr": 0.1},
            },
            "training.lr",
        ),
    ],
)
def test_unknown_spec_fields_are_refused_naming_the_field(
    spec: dict[str, Any], field: str, user: tuple[str, Headers], client: TestClient
) -> None:
    _, headers = user
    before = image_balance(client, headers)
    for path, body in (("/v1/quote", spec), ("/v1/jobs", {"spec": spec}), ("/v1/jobs", spec)):
        res = client.post(path, json=body, headers=headers)
        assert res.status_code == 422, res.text
        assert res.json()["field"] == field and field in res.json()["detail"]
    assert image_balance(client, headers) == before  # nothing held, nothing charged


def test_tune_prompt_unknown_field_is_refused(
    user: tuple[str, Headers], client: TestClient
) -> None:
    res = client.post(
        "/v1/tunes/job_nope/prompts", json={"prompt": "x", "num_image": 2}, headers=user[1]
    )
    assert res.status_code in (404, 422), res.text  # unknown field first, or unknown tune
    if res.status_code == 422:
        assert res.json()["field"] == "num_image"


def test_openapi_documents_every_status_with_a_model_and_an_example(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            assert 422 in map(int, op["responses"]), (method, path)
            for code, response in op["responses"].items():
                content = response.get("content", {})
                assert content, (method, path, code)
                for media, body in content.items():
                    if media == "application/json":
                        assert "schema" in body, (method, path, code)
                        assert "example" in body or "examples" in body, (method, path, code)
    submit = schema["paths"]["/v1/jobs"]["post"]
    assert "accepted and queued" in submit["responses"]["202"]["description"]
    examples = submit["requestBody"]["content"]["application/json"]["examples"]
    types = {e["value"]["spec"]["type"] for e in examples.values()}
    assert types == {
        "txt2img",
        "upscale",
        "face_enhance",
        "remove_background",
        "tune",
        "tune_prompt",
    }
    quote_examples = schema["paths"]["/v1/quote"]["post"]["requestBody"]["content"][
        "application/json"
    ]["examples"]
    assert len(quote_examples) == 6
    ledger = schema["paths"]["/v1/ledger"]["get"]["parameters"]
    before = next(p for p in ledger if p["name"] == "before")
    assert before["schema"]["anyOf"][0]["maximum"] == 2**63 - 1


def test_docs_are_served_from_local_assets(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn." not in page.text and "/docs-assets/swagger-ui-bundle.js" in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        res = client.get(f"/docs-assets/{asset}")
        assert res.status_code == 200 and len(res.content) > 10_000, asset
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and "cdn." not in redoc.text
    assert "fonts.googleapis" not in redoc.text


def test_docs_routes_are_labelled_in_the_request_metrics(client: TestClient) -> None:
    client.get("/docs")
    client.get("/openapi.json")
    text = client.get("/metrics").text
    assert 'route="/docs"' in text and 'route="/openapi.json"' in text
    client.get("/no/such/path")
    assert 'route="unmatched"' in client.get("/metrics").text
