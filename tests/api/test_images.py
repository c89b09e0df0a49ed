"""The HTTP API's image uploads and inline image_b64 inputs: bounds, formats and
decompression bombs."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from orchestrator.jobs.images import IMAGE_BYTES_MAX
from orchestrator.tables import jobs as jobs_table
from tests.api_helpers import (
    Headers,
    image_bytes,
    png_bomb,
    submit,
)

# --- images -----------------------------------------------------------------------------


def upload(http: TestClient, headers: Headers, data: bytes, name: str = "in.png") -> Any:
    return http.post("/v1/images", files={"file": (name, data, "image/png")}, headers=headers)


def test_image_upload(
    client: TestClient, user: tuple[str, Headers], other: tuple[str, Headers]
) -> None:
    res = upload(client, user[1], image_bytes("PNG", (64, 48)))
    assert res.status_code == 201, res.text
    body = res.json()
    assert body["image_id"].startswith("img_")
    assert (body["width"], body["height"], body["format"]) == (64, 48, "PNG")
    raw = client.post(
        "/v1/images",
        content=image_bytes("JPEG"),
        headers={**user[1], "Content-Type": "image/jpeg"},
    )
    assert raw.status_code == 201 and raw.json()["format"] == "JPEG"
    webp = upload(client, user[1], image_bytes("WEBP"), "x.webp")
    assert webp.status_code == 201 and webp.json()["format"] == "WEBP"
    job = submit(client, user[1], {"type": "upscale", "image_id": body["image_id"], "scale": 2})
    assert job.status_code == 202 and job.json()["price"]["credits"] == 1
    theirs = submit(client, other[1], {"type": "upscale", "image_id": body["image_id"]})
    assert theirs.status_code == 422 and theirs.json()["field"] == "image_id"


def test_bad_images_are_refused(client: TestClient, user: tuple[str, Headers]) -> None:
    gif = upload(client, user[1], image_bytes("GIF"), "x.gif")
    assert gif.status_code == 422 and gif.json()["field"] == "file"
    assert "GIF" in gif.json()["detail"]
    junk = upload(client, user[1], b"not an image")
    assert junk.status_code == 422
    bomb = upload(client, user[1], png_bomb(30000))
    assert bomb.status_code == 422 and bomb.json()["field"] == "file"
    assert "30000" in bomb.json()["detail"] or "bomb" in bomb.json()["detail"]
    missing = client.post("/v1/images", files={"other": ("a", b"x")}, headers=user[1])
    assert missing.status_code == 422 and missing.json()["field"] == "file"
    text = client.post(
        "/v1/images", content=b"x", headers={**user[1], "Content-Type": "text/plain"}
    )
    assert text.status_code == 415


def test_too_big_image_is_413_without_reading_it_all(
    client: TestClient, user: tuple[str, Headers]
) -> None:
    big = b"\0" * (IMAGE_BYTES_MAX + 1)
    declared = client.post(
        "/v1/images", content=big, headers={**user[1], "Content-Type": "image/png"}
    )
    assert declared.status_code == 413
    assert upload(client, user[1], big).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the stream is cut off at the limit
        for _ in range(IMAGE_BYTES_MAX // 2**20 + 2):
            yield b"\0" * 2**20

    streamed = client.post(
        "/v1/images", content=chunks(), headers={**user[1], "Content-Type": "image/png"}
    )
    assert streamed.status_code == 413 and "detail" in streamed.json()


def test_inline_image_b64_for_an_upscale_job(
    client: TestClient, user: tuple[str, Headers], pg_engine: Engine
) -> None:
    data = base64.b64encode(image_bytes("PNG", (32, 32))).decode()
    res = submit(client, user[1], {"type": "upscale", "image_b64": data, "scale": 4})
    assert res.status_code == 202, res.text
    assert res.json()["price"] == {"credits": 2, "credit_kind": "image"}
    with pg_engine.connect() as conn:
        spec = conn.execute(
            select(jobs_table.c.spec).where(jobs_table.c.id == res.json()["id"])
        ).scalar_one()
    assert spec["image_id"].startswith("img_") and "image_b64" not in spec
    bomb = base64.b64encode(png_bomb(20000)).decode()
    refused = submit(client, user[1], {"type": "upscale", "image_b64": bomb})
    assert refused.status_code == 422 and refused.json()["field"] == "image_b64"
