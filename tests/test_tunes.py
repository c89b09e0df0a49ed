"""Tunes end to end on the tiny kit: the product worker trains a LoRA (gpu.train) and renders
64 images (gpu.txt2img); real PostgreSQL, Redis and model code."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image
from sqlalchemy import Engine, select

from billing import ledger
from billing.db import run_transaction
from billing.verify import verify
from orchestrator.jobs import service as jobs
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.scheduling.scheduler import nudge
from orchestrator.settings import get_settings
from orchestrator.settlement import retention
from orchestrator.storage import Storage
from orchestrator.tunes import service as tunes
from orchestrator.tunes.checkpoints import checkpoint_key
from tests.ledger_helpers import grant, new_account
from tests.lifecycle_helpers import row, wait_until
from tests.support.services import celery_worker

TUNE_TIMEOUT_S = 300
RENDER_PX = 128  # a setting (production: 512); small keeps the suite fast
RENDER_STEPS = 2


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tune worker's TOLLGATE_WORK_DIR (local training checkpoints)."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def tune_worker(
    service_env: dict[str, str],
    settings_env: None,
    models_kit_dir: Path,
    work_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    env = {
        **service_env,
        "TOLLGATE_MODELS": str(models_kit_dir / "models.toml"),
        "TOLLGATE_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TOLLGATE_TUNE_RENDER_SIZE_PX": str(RENDER_PX),
        "TOLLGATE_TUNE_RENDER_STEPS_MAX": str(RENDER_STEPS),
        "TOLLGATE_WORK_DIR": str(work_dir),
    }
    with celery_worker(
        env,
        tmp_path_factory.mktemp("logs"),
        app="tests.support.tune_worker_app",
        queues="gpu.train,gpu.txt2img",
        concurrency=1,
    ) as proc:
        yield proc


def photos() -> list[str]:
    from skimage import data

    face = Image.fromarray(data.astronaut())
    out = []
    for left, top in ((0, 0), (40, 0), (0, 40), (40, 40)):
        buf = io.BytesIO()
        face.crop((left, top, left + 400, top + 400)).resize((128, 128)).save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def tune_spec(steps: int = 8, **extra: Any) -> dict[str, Any]:
    return {
        "type": "tune",
        "name": "me",
        "subject": "woman",
        "images_b64": photos(),
        "training": {"steps": steps},
        **extra,
    }


def submit(
    engine: Engine, storage: Storage, redis_url: str, account: str, spec: dict[str, Any]
) -> str:
    job_id = str(jobs.submit(engine, storage, account, spec).job["id"])
    nudge(engine, Publisher(redis_url), job_id)
    return job_id


def wait_status(engine: Engine, job_id: str, *statuses: str) -> Any:
    return wait_until(engine, job_id, lambda r: r.status in statuses, TUNE_TIMEOUT_S)


def balance(engine: Engine, account: str, kind: str) -> ledger.Balance:
    return run_transaction(engine, lambda c: ledger.get_balance(c, account, kind))


def funded(engine: Engine, tune: int, tune_image: int, plan: str = "free") -> str:
    acc = new_account(engine, plan)
    if tune:
        grant(engine, acc, tune, kind="tune")
    if tune_image:
        grant(engine, acc, tune_image, kind="tune_image")
    return acc


def test_full_flow_trains_renders_64_and_charges_exactly(
    tune_worker: Any,
    pg_engine: Engine,
    storage: Storage,
    redis_url: str,
    models_kit_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    acc = funded(pg_engine, tune=1, tune_image=64)
    tune_id = submit(
        pg_engine,
        storage,
        redis_url,
        acc,
        tune_spec(steps=30, training={"steps": 30, "learning_rate": 1e-3}),
    )
    assert balance(pg_engine, acc, "tune_image").held == 64
    done = wait_status(pg_engine, tune_id, "succeeded", "failed")
    assert done.status == "succeeded", done.error
    delivered = [o for o in done.outputs if o["delivered"]]
    assert len(delivered) == 64
    assert sorted(o["index"] for o in delivered) == list(range(64))
    t = tunes.tune_view(pg_engine, storage, acc, tune_id)
    assert t["credits"]["tune"] == {"held": 0, "charged": 1, "refunded": 0}
    assert t["credits"]["tune_image"] == {"held": 0, "charged": 64, "refunded": 0}
    assert len(t["outputs"]) == 64 and t["contact_sheet"] == f"/v1/tunes/{tune_id}/contact_sheet"
    sheet = Image.open(io.BytesIO(storage.get(f"tunes/{tune_id}/contact_sheet.png")))
    assert sheet.width > 8 * 128 and sheet.height >= 8 * 128
    assert t["expires_at"] is not None  # free plan: 30 days
    # started_at is when training began: before trained_at, not the render's start.
    assert t["started_at"] is not None and t["started_at"] <= t["trained_at"], t
    # The demo's table shows both holds: 1 tune credit and the render's 64 tune_image ones.
    from orchestrator.demo import _print_table

    capsys.readouterr()
    _print_table([jobs.get(pg_engine, acc, tune_id)])
    table = capsys.readouterr().out.splitlines()
    tune_row = next(line for line in table if line.startswith(tune_id))
    render_row = next(line for line in table if "+ render" in line)
    assert "(tune)" in tune_row and tune_row.split()[2] == "1"
    assert render_row.split()[2:5] == ["64", "64", "0"] and "(tune_image)" in render_row
    b_tune, b_img = balance(pg_engine, acc, "tune"), balance(pg_engine, acc, "tune_image")
    assert (b_tune.balance, b_tune.held, b_img.balance, b_img.held) == (0, 0, 0, 0)
    tune = run_transaction(pg_engine, lambda c: tunes.get_tune(c, tune_id))
    assert tune.image_keys == []  # the training photos are deleted
    assert not any(storage.exists(k) for k in _photo_keys(pg_engine, acc))
    _assert_lora_changes_outputs(models_kit_dir, storage, tune)
    assert run_transaction(pg_engine, verify) == []


def _photo_keys(engine: Engine, account: str) -> list[str]:
    from orchestrator.tables import images

    return list(
        run_transaction(
            engine,
            lambda c: c.execute(
                select(images.c.path).where(images.c.account_id == account)
            ).scalars(),
        )
    )


def _assert_lora_changes_outputs(kit: Path, storage: Storage, tune: Any) -> None:
    from models.cache import ModelCache
    from models.manager import ModelManager

    lora = kit.parent / f"{tune.id}.safetensors"
    lora.write_bytes(storage.get(tune.lora_key))
    manager = ModelManager(kit / "models.toml", cache=ModelCache(4 * 1024**3), device="cpu")
    common = {"width": RENDER_PX, "height": RENDER_PX, "steps": 4, "guidance": 7.5, "seeds": [3]}
    prompt = f"a photo of {tune.token} {tune.subject}"
    base = manager.txt2img(tune.base_model, prompt, **common).images[0]
    tuned = manager.txt2img(tune.base_model, prompt, lora=str(lora), **common).images[0]
    diff = np.abs(np.asarray(base, dtype=float) - np.asarray(tuned, dtype=float)).mean() / 255
    assert diff > 1e-3


def test_without_tune_image_credits_it_trains_waits_then_renders_on_grant(
    tune_worker: Any, pg_engine: Engine, storage: Storage, redis_url: str
) -> None:
    from fastapi.testclient import TestClient

    from orchestrator.api.app import create_app

    acc = funded(pg_engine, tune=1, tune_image=0)
    tune_id = submit(pg_engine, storage, redis_url, acc, tune_spec())
    waiting = wait_status(pg_engine, tune_id, "awaiting_credits", "failed")
    assert waiting.status == "awaiting_credits", waiting.error
    assert balance(pg_engine, acc, "tune").balance == 0
    assert balance(pg_engine, acc, "tune_image").held == 0
    assert tunes.tune_view(pg_engine, storage, acc, tune_id)["credits"]["tune_image"] == {
        "held": 0,
        "charged": 0,
        "refunded": 0,
    }
    admin = {"Authorization": f"Bearer {get_settings().admin_token}"}
    with TestClient(create_app()) as client:
        r = client.post(
            f"/v1/accounts/{acc}/grants",
            headers=admin,
            json={
                "kind": "tune_image",
                "amount": 64,
                "source": "purchase",
                "reference": f"buy-{tune_id}",
            },
        )
        assert r.status_code == 201, r.text
    done = wait_status(pg_engine, tune_id, "succeeded", "failed")
    assert done.status == "succeeded", done.error
    assert balance(pg_engine, acc, "tune_image").balance == 0


def test_five_of_64_withheld_are_released(
    tune_worker: Any, pg_engine: Engine, storage: Storage, redis_url: str
) -> None:
    redis.Redis.from_url(redis_url).set("tollgate:test:withhold", 5)
    acc = funded(pg_engine, tune=1, tune_image=64)
    tune_id = submit(pg_engine, storage, redis_url, acc, tune_spec())
    done = wait_status(pg_engine, tune_id, "succeeded", "failed")
    assert done.status == "succeeded", done.error
    assert sum(1 for o in done.outputs if o["delivered"]) == 59
    assert "5 of 64 outputs not delivered" in done.error
    credits = tunes.tune_view(pg_engine, storage, acc, tune_id)["credits"]["tune_image"]
    assert credits == {"held": 0, "charged": 59, "refunded": 5}
    assert balance(pg_engine, acc, "tune_image").available == 5


def test_training_failure_releases_both_holds(
    tune_worker: Any, pg_engine: Engine, storage: Storage, redis_url: str
) -> None:
    acc = funded(pg_engine, tune=1, tune_image=64)
    tune_id = str(jobs.submit(pg_engine, storage, acc, tune_spec()).job["id"])
    # The training photos vanish from storage before a worker gets the job: training fails.
    for key in run_transaction(pg_engine, lambda c: tunes.get_tune(c, tune_id)).image_keys:
        storage.delete(key)
    nudge(pg_engine, Publisher(redis_url), tune_id)
    done = wait_status(pg_engine, tune_id, "failed", "succeeded", "awaiting_credits")
    assert done.status == "failed"
    assert done.error == "the training photos are missing from storage"
    assert (done.charged, done.refunded) == (0, 1)
    assert balance(pg_engine, acc, "tune").available == 1
    assert balance(pg_engine, acc, "tune_image").available == 64
    tune = run_transaction(pg_engine, lambda c: tunes.get_tune(c, tune_id))
    assert tune.image_keys == []  # the photo list is cleared on failure too


def _pool_children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_worker_killed_mid_training_resumes_from_the_stored_checkpoint(
    tune_worker: Any, work_dir: Path, pg_engine: Engine, storage: Storage, redis_url: str
) -> None:
    acc = funded(pg_engine, tune=1, tune_image=0)
    tune_id = submit(pg_engine, storage, redis_url, acc, tune_spec(steps=150))
    wait_until(
        pg_engine,
        tune_id,
        lambda r: r.status == "training" and r.progress_step >= 40,
        TUNE_TIMEOUT_S,
    )
    assert storage.exists(checkpoint_key(tune_id))  # checkpoints every 15 steps
    # The next attempt lands on this worker, but as if it were another one: the training
    # child is frozen, its local checkpoints deleted, then it is killed.
    children = _pool_children(tune_worker.pid)
    for child in children:
        os.kill(child, signal.SIGSTOP)
    shutil.rmtree(work_dir / "tunes" / tune_id)
    for child in children:
        os.kill(child, signal.SIGKILL)
    done = wait_status(pg_engine, tune_id, "awaiting_credits", "failed")
    assert done.status == "awaiting_credits", done.error
    assert done.attempt == 0  # reset for the render phase, after attempt 2 trained
    tune = run_transaction(pg_engine, lambda c: tunes.get_tune(c, tune_id))
    assert tune.training["resumed_from"] >= 30  # from storage: no local checkpoint was left
    assert not storage.exists(checkpoint_key(tune_id))  # deleted when training ended
    assert not (work_dir / "tunes" / tune_id).exists()
    assert balance(pg_engine, acc, "tune").balance == 0  # charged once
    assert run_transaction(pg_engine, verify) == []


def test_retention_by_plan_with_an_injected_clock(
    tune_worker: Any, pg_engine: Engine, storage: Storage, redis_url: str
) -> None:
    free = funded(pg_engine, tune=1, tune_image=0, plan="free")
    paid = funded(pg_engine, tune=1, tune_image=0, plan="standard")
    ids = {
        acc: submit(pg_engine, storage, redis_url, acc, tune_spec(steps=1)) for acc in (free, paid)
    }
    for tune_id in ids.values():
        assert (
            wait_status(pg_engine, tune_id, "awaiting_credits", "failed").status
            == "awaiting_credits"
        )
    free_tune = run_transaction(pg_engine, lambda c: tunes.get_tune(c, ids[free]))
    trained = free_tune.trained_at
    assert free_tune.expires_at == trained + timedelta(days=30)
    assert run_transaction(pg_engine, lambda c: tunes.get_tune(c, ids[paid])).expires_at is None
    # Day 29: nothing expires. Day 31: the free tune's weights go; the paid one stays.
    assert ids[free] not in retention.sweep_expired(
        pg_engine, storage, trained + timedelta(days=29)
    )
    storage.put(checkpoint_key(ids[free]), b"a leftover training checkpoint")
    swept = retention.sweep_expired(pg_engine, storage, trained + timedelta(days=31))
    assert ids[free] in swept and ids[paid] not in swept
    assert row(pg_engine, ids[free]).status == "expired"
    assert not storage.exists(free_tune.lora_key)
    assert not storage.exists(checkpoint_key(ids[free]))
    grant(pg_engine, free, 8, kind="tune_image")
    with pytest.raises(tunes.TuneGone):
        jobs.submit(
            pg_engine,
            storage,
            free,
            {
                "type": "tune_prompt",
                "tune_id": ids[free],
                "prompt": f"a photo of {free_tune.token} woman",
            },
        )
    assert balance(pg_engine, free, "tune_image").held == 0  # nothing held for a gone tune
    # The paid plan lapses: its clock starts at the lapse.
    lapse = trained + timedelta(days=100)
    retention.set_plan(pg_engine, paid, "free", now=lapse)
    paid_tune = run_transaction(pg_engine, lambda c: tunes.get_tune(c, ids[paid]))
    assert paid_tune.expires_at == lapse + timedelta(days=30)
    assert ids[paid] not in retention.sweep_expired(pg_engine, storage, lapse + timedelta(days=29))
    assert ids[paid] in retention.sweep_expired(pg_engine, storage, lapse + timedelta(days=31))


def test_cancel_during_training_refunds_both_holds(
    tune_worker: Any, pg_engine: Engine, storage: Storage, redis_url: str
) -> None:
    acc = funded(pg_engine, tune=1, tune_image=64)
    tune_id = submit(pg_engine, storage, redis_url, acc, tune_spec(steps=150))
    wait_until(
        pg_engine,
        tune_id,
        lambda r: r.status == "training" and r.progress_step >= 16,
        TUNE_TIMEOUT_S,
    )
    assert storage.exists(checkpoint_key(tune_id))  # the step-15 checkpoint
    assert jobs.cancel(pg_engine, acc, tune_id)["status"] == "training"  # stops at its next step
    done = wait_status(pg_engine, tune_id, "canceled", "failed", "rendering", "awaiting_credits")
    assert done.status == "canceled"
    assert not storage.exists(checkpoint_key(tune_id))
    assert balance(pg_engine, acc, "tune").available == 1
    assert balance(pg_engine, acc, "tune_image").available == 64


def test_later_prompts_over_http_and_gone_after_retention(
    tune_worker: Any, pg_engine: Engine, storage: Storage, redis_url: str
) -> None:
    from fastapi.testclient import TestClient

    from orchestrator import accounts
    from orchestrator.api.app import create_app

    new = accounts.create_account(pg_engine, "prompter", "free")
    grant(pg_engine, new.id, 1, kind="tune")
    tune_id = submit(pg_engine, storage, redis_url, new.id, tune_spec(steps=1))
    assert (
        wait_status(pg_engine, tune_id, "awaiting_credits", "failed").status == "awaiting_credits"
    )
    grant(pg_engine, new.id, 4, kind="tune_image")  # not enough for the 64-image render
    auth = {"Authorization": f"Bearer {new.api_key}"}
    with TestClient(create_app()) as client:
        tune = client.get(f"/v1/tunes/{tune_id}", headers=auth).json()
        assert tune["status"] == "awaiting_credits" and tune["token"]
        r = client.post(f"/v1/tunes/{tune_id}/render", headers=auth)
        assert r.status_code == 402 and r.json()["needed"] == 64
        bad = client.post(
            f"/v1/tunes/{tune_id}/prompts",
            headers=auth,
            json={"prompt": "a photo of somebody else"},
        )
        assert bad.status_code == 422 and bad.json()["field"] == "prompt"
        r = client.post(
            f"/v1/tunes/{tune_id}/prompts",
            headers=auth,
            json={
                "style": "oil-painting",
                "num_images": 2,
                "width": 256,
                "height": 256,
                "steps": 2,
            },
        )
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["price"] == {"credits": 2, "credit_kind": "tune_image"}
        done = wait_status(pg_engine, job["id"], "succeeded", "failed")
        assert (done.status, done.charged) == ("succeeded", 2), done.error
        expired_at = run_transaction(pg_engine, lambda c: tunes.get_tune(c, tune_id)).expires_at
        retention.sweep_expired(pg_engine, storage, expired_at + timedelta(seconds=1))
        gone = client.post(
            f"/v1/tunes/{tune_id}/prompts",
            headers=auth,
            json={
                "style": "oil-painting",
                "num_images": 1,
                "width": 256,
                "height": 256,
                "steps": 2,
            },
        )
        assert gone.status_code == 410, gone.text
        assert client.get(f"/v1/tunes/{tune_id}", headers=auth).json()["status"] == "expired"
    assert balance(pg_engine, new.id, "tune_image").available == 2


def test_without_a_tune_credit_the_tune_is_rejected(
    pg_engine: Engine, storage: Storage, settings_env: None
) -> None:
    from billing import InsufficientCredits

    acc = funded(pg_engine, tune=0, tune_image=64)
    with pytest.raises(jobs.JobRejected) as info:
        jobs.submit(pg_engine, storage, acc, tune_spec())
    assert isinstance(info.value.cause, InsufficientCredits)
    assert (info.value.cause.kind, info.value.cause.needed) == ("tune", 1)
    rejected = row(pg_engine, info.value.job_id)
    assert rejected.status == "rejected" and "images_b64" not in rejected.spec
    assert balance(pg_engine, acc, "tune_image").held == 0  # nothing held


def test_an_sdxl_tune_trains_and_renders(
    tune_worker: Any, pg_engine: Engine, storage: Storage, redis_url: str
) -> None:
    acc = funded(pg_engine, tune=1, tune_image=64)
    tune_id = submit(pg_engine, storage, redis_url, acc, tune_spec(base_model="sdxl"))
    done = wait_status(pg_engine, tune_id, "succeeded", "failed")
    assert done.status == "succeeded", done.error
    assert sum(1 for o in done.outputs if o["delivered"]) == 64
    tune = run_transaction(pg_engine, lambda c: tunes.get_tune(c, tune_id))
    assert tune.base_model == "sdxl" and storage.exists(tune.lora_key)
    assert balance(pg_engine, acc, "tune_image").balance == 0
