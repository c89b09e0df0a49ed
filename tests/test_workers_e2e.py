"""Every job family end to end on the tiny model kit: the product's Celery worker
(`workers.app`, real model code, no mocks) behind the orchestrator, real PostgreSQL/Redis."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import Engine

from billing import quote
from orchestrator.jobs import service as jobs
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.scheduling.scheduler import nudge
from orchestrator.standalone import free_port
from orchestrator.storage import Storage
from tests.ledger_helpers import grant, new_account
from tests.lifecycle_helpers import available, wait_terminal
from tests.support.services import kit_worker

JOB_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def model_worker(
    service_env: dict[str, str],
    settings_env: None,
    models_kit_dir: Path,
    metrics_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    env = {
        **service_env,
        "TOLLGATE_WORKER_METRICS_PORT": str(metrics_port),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("prom")),
    }
    logs = tmp_path_factory.mktemp("logs")
    with kit_worker(env, models_kit_dir, logs, "gpu.txt2img,gpu.post") as proc:
        yield proc


@pytest.fixture
def account(pg_engine: Engine) -> str:
    acc = new_account(pg_engine)
    grant(pg_engine, acc, 50)
    return acc


def photo_b64(size: int = 256, face: bool = True) -> str:
    from skimage import data

    img = (
        Image.fromarray(data.astronaut()).resize((size, size))
        if face
        else Image.new("RGB", (size, size), (128, 128, 128))
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


Run = Callable[[dict[str, Any]], Any]


@pytest.fixture
def run(
    model_worker: Any, pg_engine: Engine, storage: Storage, redis_url: str, account: str
) -> Run:
    """Submit `spec` for `account`, dispatch it to the model worker, and wait for its end."""

    def submit_and_wait(spec: dict[str, Any]) -> Any:
        job_id = jobs.submit(pg_engine, storage, account, spec).job["id"]
        nudge(pg_engine, Publisher(redis_url), job_id)
        return wait_terminal(pg_engine, job_id, timeout_s=JOB_TIMEOUT_S)

    return submit_and_wait


def output_image(storage: Storage, done: Any, index: int = 0) -> Image.Image:
    out = next(o for o in done.outputs if o["index"] == index and o["delivered"])
    image = Image.open(io.BytesIO(storage.get(out["key"])))
    image.load()
    return image


def test_txt2img_renders_and_charges_the_quoted_price(
    run: Run, pg_engine: Engine, storage: Storage, account: str
) -> None:
    spec = {
        "type": "txt2img",
        "prompt": "a lighthouse",
        "width": 256,
        "height": 320,
        "steps": 4,
        "num_images": 2,
        "seed": 11,
    }
    done = run(spec)
    assert done.status == "succeeded", done.error
    assert done.charged == quote(spec).credits == 2
    images = [output_image(storage, done, i) for i in range(2)]
    assert all(im.size == (256, 320) for im in images)
    assert images[0].text["tollgate:seed"] == "11" and images[1].text["tollgate:seed"] == "12"
    assert images[0].text["tollgate:prompt"] == "a lighthouse"
    assert (done.progress_step, done.progress_total) == (4, 4)
    assert available(pg_engine, account) == 48


@pytest.mark.parametrize("scale", [2, 4])
def test_upscale(run: Run, storage: Storage, scale: int) -> None:
    spec = {"type": "upscale", "scale": scale, "image_b64": photo_b64(64)}
    done = run(spec)
    assert done.status == "succeeded", done.error
    assert done.charged == quote(spec).credits == {2: 1, 4: 2}[scale]
    assert output_image(storage, done).size == (64 * scale, 64 * scale)


def test_face_enhance_and_no_face_is_refunded(
    run: Run, pg_engine: Engine, storage: Storage, account: str
) -> None:
    done = run({"type": "face_enhance", "image_b64": photo_b64(256)})
    assert done.status == "succeeded", done.error
    assert done.charged == 1
    width, height = output_image(storage, done).size  # GFPGAN upscales by its registry factor
    assert width == height and width % 256 == 0
    blank = run({"type": "face_enhance", "image_b64": photo_b64(256, face=False)})
    assert (blank.status, blank.charged, blank.refunded) == ("failed", 0, 1)
    assert "no face found" in blank.error
    assert available(pg_engine, account) == 49


def test_remove_background_gives_rgba_with_varying_alpha(
    run: Run, pg_engine: Engine, storage: Storage, account: str
) -> None:
    done = run({"type": "remove_background", "image_b64": photo_b64(128)})
    assert done.status == "succeeded", done.error
    assert done.charged == 1
    image = output_image(storage, done)
    assert image.mode == "RGBA"
    low, high = image.getchannel("A").getextrema()
    assert low < high


def test_a_model_error_refunds(run: Run, pg_engine: Engine, account: str) -> None:
    done = run(
        {"type": "upscale", "scale": 2, "model": "no-such-model", "image_b64": photo_b64(64)}
    )
    assert (done.status, done.charged, done.refunded) == ("failed", 0, 1)
    assert "no-such-model" in done.error
    assert available(pg_engine, account) == 50


def test_models_load_once_per_worker_process(run: Run, metrics_port: int) -> None:
    for seed in (1, 2, 3):
        spec = {"type": "txt2img", "prompt": "x", "width": 256, "height": 256, "steps": 2}
        done = run({**spec, "seed": seed})
        assert done.status == "succeeded", done.error
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    loads = re.search(r'tollgate_worker_model_loads_total\{model="sd15"\} (\S+)', text)
    assert loads is not None, text[:2000]
    assert float(loads.group(1)) == 1.0
