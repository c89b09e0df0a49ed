"""orchestrator.storage on a local directory: durable, whole-file writes and safe keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.storage import Storage


def test_put_get_overwrite_and_no_temporary_files_left(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "store"))
    assert storage.put("outputs/job_1/a1_0.png", b"first") == "outputs/job_1/a1_0.png"
    assert storage.get("outputs/job_1/a1_0.png") == b"first"
    storage.put("outputs/job_1/a1_0.png", b"second")
    assert storage.get("outputs/job_1/a1_0.png") == b"second"
    assert os.listdir(tmp_path / "store" / "outputs" / "job_1") == ["a1_0.png"]
    assert storage.local_path("outputs/job_1/a1_0.png") == str(
        tmp_path / "store" / "outputs" / "job_1" / "a1_0.png"
    )


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "store"))
    with pytest.raises(TypeError):  # the temporary file exists when the write fails
        storage.put("outputs/job_2/a1_0.png", "text, not bytes")  # type: ignore[arg-type]
    assert os.listdir(tmp_path / "store" / "outputs" / "job_2") == []
    assert not storage.exists("outputs/job_2/a1_0.png")


@pytest.mark.parametrize("key", ["../escape.png", "outputs/../../escape.png", "/etc/passwd"])
def test_keys_cannot_leave_the_root(tmp_path: Path, key: str) -> None:
    storage = Storage(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="bad storage key"):
        storage.put(key, b"x")
