"""Jobs, a tune and retention end to end on S3: moto's S3 server (a real HTTP endpoint, a
child process) holds inputs, outputs, LoRA weights and contact sheets; the product's Celery
worker (tiny model kit) and the API read and write it through TOLLGATE_STORAGE_URL=s3://..."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.api.app import create_app
from orchestrator.settlement import retention
from orchestrator.settlement.output_retention import sweep_outputs
from orchestrator.storage import Storage
from orchestrator.tunes import service as tunes
from tests.api_helpers import Headers, make_account
from tests.lifecycle_helpers import wait_until
from tests.support.s3 import environ
from tests.support.services import kit_worker
from tests.test_tunes import photos
from tests.test_workers_e2e import photo_b64

JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def s3_settings(s3_env: dict[str, str], settings_env: None) -> Iterator[dict[str, str]]:
    with environ(s3_env):
        yield s3_env


@pytest.fixture(scope="module")
def s3(s3_settings: dict[str, str]) -> Storage:
    return Storage(s3_settings["TOLLGATE_STORAGE_URL"])


@pytest.fixture(scope="module")
def bucket(s3_settings: dict[str, str]) -> Any:
    """A boto3 view of the bucket that does not go through orchestrator.storage."""
    client = boto3.session.Session().client(
        "s3", endpoint_url=s3_settings["AWS_ENDPOINT_URL"], region_name="us-east-1"
    )
    name = s3_settings["TOLLGATE_TEST_S3_BUCKET"]

    class Bucket:
        def keys(self, under: str) -> list[str]:
            page = client.list_objects_v2(Bucket=name, Prefix=f"tollgate/{under}")
            return [o["Key"].removeprefix("tollgate/") for o in page.get("Contents", [])]

    return Bucket()


@pytest.fixture(scope="module")
def s3_worker(
    service_env: dict[str, str],
    s3_settings: dict[str, str],
    models_kit_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    env = {
        **service_env,
        **s3_settings,
        "TOLLGATE_TUNE_RENDER_SIZE_PX": "64",
        "TOLLGATE_TUNE_RENDER_STEPS_MAX": "1",
        "TOLLGATE_WORK_DIR": str(tmp_path_factory.mktemp("work")),
    }
    queues = "gpu.txt2img,gpu.post,gpu.train,tollgate.callbacks"
    with kit_worker(env, models_kit_dir, tmp_path_factory.mktemp("logs"), queues) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(s3_settings: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app()) as test_client:
        yield test_client


def user(client: TestClient, **grants: int) -> tuple[str, Headers]:
    from tests.ledger_helpers import grant

    acc, headers = make_account(client, [], credits=grants.pop("image", 0))
    from orchestrator.db import get_engine

    for kind, amount in grants.items():
        grant(get_engine(), acc, amount, kind=kind)
    return acc, headers


def finished(engine: Engine, job_id: str) -> Any:
    done = wait_until(engine, job_id, lambda r: r.finished_at is not None, JOB_TIMEOUT_S)
    assert done.status == "succeeded", done.error
    return done


def test_a_job_on_s3_presigned_urls_and_retention(
    s3_worker: Any, client: TestClient, pg_engine: Engine, s3: Storage, bucket: Any
) -> None:
    acc, headers = user(client, image=5)
    spec = {
        "type": "txt2img",
        "prompt": "a lighthouse",
        "width": 256,
        "height": 256,
        "steps": 2,
        "num_images": 2,
        "seed": 3,
    }
    job_id = client.post("/v1/jobs", json={"spec": spec}, headers=headers).json()["id"]
    finished(pg_engine, job_id)
    assert sorted(bucket.keys(f"outputs/{job_id}/")) == [
        f"outputs/{job_id}/a1_0.png",
        f"outputs/{job_id}/a1_1.png",
    ]
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    out = job["outputs"][0]
    endpoint = s3.presigned_get("x", 1)
    assert endpoint is not None and out["url"].startswith(endpoint.split("/tollgate/")[0])
    assert parse_qs(urlsplit(out["url"]).query)["X-Amz-Expires"] == ["3600"]
    direct = httpx.get(out["url"])  # straight from the bucket, no API key
    assert direct.status_code == 200
    image = Image.open(io.BytesIO(direct.content))
    assert image.size == (256, 256) and image.text["tollgate:seed"] == "3"
    assert client.get(out["api_url"], headers=headers).content == direct.content
    # Retention (free plan, 7 days): the objects go, the URLs stop working, the job stays.
    swept = sweep_outputs(pg_engine, s3, utcnow() + timedelta(days=8), account_id=acc)
    assert job_id in swept.jobs and bucket.keys(f"outputs/{job_id}/") == []
    assert httpx.get(out["url"]).status_code == 404  # S3: NoSuchKey
    assert client.get(out["api_url"], headers=headers).status_code == 410
    after = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert after["outputs"][0]["url"] is None and after["charged"] == 2


def test_an_input_image_on_s3_is_used_then_deleted_by_retention(
    s3_worker: Any, client: TestClient, pg_engine: Engine, s3: Storage, bucket: Any
) -> None:
    acc, headers = user(client, image=2)
    spec = {"type": "upscale", "scale": 2, "image_b64": photo_b64(32)}
    job_id = client.post("/v1/jobs", json={"spec": spec}, headers=headers).json()["id"]
    done = finished(pg_engine, job_id)
    [input_key] = [
        k for k in bucket.keys("inputs/") if k.endswith(done.spec["image_id"] + ".png")
    ] or [None]
    assert input_key is not None, bucket.keys("inputs/")
    out = client.get(f"/v1/jobs/{job_id}", headers=headers).json()["outputs"][0]
    assert Image.open(io.BytesIO(httpx.get(out["url"]).content)).size == (64, 64)
    swept = sweep_outputs(pg_engine, s3, utcnow() + timedelta(days=8), account_id=acc)
    assert done.spec["image_id"] in swept.images and input_key not in bucket.keys("inputs/")


def test_a_tune_on_s3_trains_renders_and_expires(
    s3_worker: Any, client: TestClient, pg_engine: Engine, s3: Storage, bucket: Any
) -> None:
    acc, headers = user(client, tune=1, tune_image=64)
    spec = {
        "type": "tune",
        "name": "me",
        "subject": "woman",
        "images_b64": photos(),
        "training": {"steps": 2},
    }
    res = client.post("/v1/jobs", json={"spec": spec}, headers=headers)
    assert res.status_code == 202, res.text
    tune_id = res.json()["id"]
    started = time.monotonic()
    done = finished(pg_engine, tune_id)
    assert len([o for o in done.outputs if o["delivered"]]) == 64, time.monotonic() - started
    tune = run_transaction(pg_engine, lambda c: tunes.get_tune(c, tune_id))
    assert tune.lora_key in bucket.keys(f"tunes/{tune_id}/")  # the weights live in S3
    assert f"tunes/{tune_id}/contact_sheet.png" in bucket.keys(f"tunes/{tune_id}/")
    assert tune.image_keys == []  # training photos deleted from the bucket
    sheet = client.get(f"/v1/tunes/{tune_id}/contact_sheet", headers=headers)
    assert sheet.status_code == 200 and Image.open(io.BytesIO(sheet.content)).width >= 8 * 64
    view = client.get(f"/v1/jobs/{tune_id}", headers=headers).json()
    assert httpx.get(view["outputs"][63]["url"]).status_code == 200
    tune_out = client.get(f"/v1/tunes/{tune_id}", headers=headers).json()["outputs"][0]
    assert "X-Amz-Signature" in tune_out["url"] and tune_out["expires_at"]
    # Output retention (free plan: 7 days) deletes the renders and the sheet; tune retention
    # (30 days after training) the weights.
    swept = sweep_outputs(pg_engine, s3, utcnow() + timedelta(days=8), account_id=acc)
    assert tune_id in swept.jobs and tune.lora_key in bucket.keys(f"tunes/{tune_id}/")
    assert tune_id in retention.sweep_expired(pg_engine, s3, tune.trained_at + timedelta(days=31))
    assert bucket.keys(f"outputs/{tune_id}/") == [] and bucket.keys(f"tunes/{tune_id}/") == []
    assert client.get(f"/v1/tunes/{tune_id}/contact_sheet", headers=headers).status_code == 410
