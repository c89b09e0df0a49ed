"""A LoRA training checkpoint kept in the job's storage (orchestrator.tunes.checkpoints) on
the tiny SD 1.x: "worker A" dies right after a checkpoint, "worker B" (another, empty work
dir) resumes from the stored one and reaches the weights of an uninterrupted run. Real
storage: a local directory (and moto's S3 server for the store itself)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import Canceled
from models.lora import LoraTrainConfig, latest_checkpoint
from orchestrator.storage import Storage
from orchestrator.tunes.checkpoints import CheckpointTooLarge, StoredCheckpoint, checkpoint_key
from tests.support.s3 import environ

CFG = LoraTrainConfig(
    token="zwx",
    subject="person",
    steps=4,
    batch_size=2,
    checkpoint_every=2,
    resolution=64,
    learning_rate=1e-2,
    seed=5,
)


class WorkerDied(Exception):
    pass


def _images() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]


@pytest.fixture(params=["local", "s3"])
def any_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        yield Storage(str(tmp_path / "storage"))
        return
    s3_env = request.getfixturevalue("s3_env")
    with environ(s3_env):
        yield Storage(s3_env["TOLLGATE_STORAGE_URL"])


def test_another_worker_resumes_from_the_stored_checkpoint(models_manager, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    storage = Storage(str(tmp_path / "storage"))
    store = StoredCheckpoint(storage, "tune-a")

    def die_at_3(step: int, total: int) -> bool:
        if step == 3:  # after the step-2 checkpoint was stored
            raise WorkerDied
        return True

    with pytest.raises(WorkerDied):
        models_manager.train_lora(
            "sd15", _images(), tmp_path / "a", CFG, on_step=die_at_3, store=store
        )
    assert storage.exists(checkpoint_key("tune-a"))

    resumed = models_manager.train_lora("sd15", _images(), tmp_path / "b", CFG, store=store)
    assert resumed.resumed_from == 2
    assert not (tmp_path / "b/checkpoints/fetched.pt").exists()
    assert [p.name for p in (tmp_path / "a/checkpoints").iterdir()] == ["checkpoint-2.pt"]

    full = models_manager.train_lora("sd15", _images(), tmp_path / "full", CFG)
    assert full.resumed_from == 0 and resumed.losses == full.losses
    a, b = load_file(full.weights), load_file(resumed.weights)
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_a_corrupt_stored_checkpoint_is_ignored_and_another_config_rejected(
    models_manager, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage(str(tmp_path / "storage"))
    store = StoredCheckpoint(storage, "tune-c")
    storage.put(store.key, b"PK\x03\x04 not a checkpoint")
    seen: list[int] = []

    def stop_at_2(step: int, total: int) -> bool:
        seen.append(step)
        return step < 2

    caplog.set_level(logging.WARNING, logger="models.lora_checkpoint")
    with pytest.raises(Canceled):
        models_manager.train_lora(
            "sd15", _images(), tmp_path / "c", CFG, on_step=stop_at_2, store=store
        )
    assert seen == [1, 2]  # started over
    assert "ignoring unreadable LoRA checkpoint" in caplog.text
    assert not (tmp_path / "c/checkpoints/fetched.pt").exists()
    # A stop writes a local checkpoint only; the stored one is a periodic one (step 2 here).
    local = latest_checkpoint(tmp_path / "c")
    assert local is not None and local.name == "checkpoint-2.pt"
    storage.put(store.key, local.read_bytes())

    # Another worker set up differently (a different config) starts over; the job never fails.
    other = replace(CFG, learning_rate=2e-2, steps=2)
    caplog.clear()
    result = models_manager.train_lora("sd15", _images(), tmp_path / "d", other, store=store)
    assert "made with a different training config" in caplog.text
    assert result.resumed_from == 0


def test_save_fetch_delete_and_the_size_limit(any_storage: Storage, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-3.pt"
    path.write_bytes(b"x" * 101)
    assert StoredCheckpoint(any_storage, "t").fetch(tmp_path / "got.pt") is None
    with pytest.raises(CheckpointTooLarge, match="step 3 is 101 bytes, over the 100-byte limit"):
        StoredCheckpoint(any_storage, "t", max_bytes=100).save(path, 3)
    assert not any_storage.exists(checkpoint_key("t"))
    StoredCheckpoint(any_storage, "t", max_bytes=101).save(path, 3)
    path.write_bytes(b"y" * 7)
    StoredCheckpoint(any_storage, "t").save(path, 6)  # replaces the last one
    got = StoredCheckpoint(any_storage, "t").fetch(tmp_path / "got.pt")
    assert got is not None and got.read_bytes() == b"y" * 7
    StoredCheckpoint(any_storage, "t").delete()
    assert not any_storage.exists(checkpoint_key("t"))


def test_a_failed_put_or_get_is_logged_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage(str(tmp_path / "storage"))
    (tmp_path / "storage/tunes").write_text("a file where the folder goes")
    path = tmp_path / "checkpoint-3.pt"
    path.write_bytes(b"x")
    store = StoredCheckpoint(storage, "t")
    store.save(path, 3)
    assert "could not store the training checkpoint of step 3" in caplog.text
    (tmp_path / "storage/tunes").unlink()
    (tmp_path / "storage/tunes/t/checkpoint.pt").mkdir(parents=True)  # unreadable as a file
    assert store.fetch(tmp_path / "got.pt") is None
    assert "could not fetch the training checkpoint" in caplog.text
