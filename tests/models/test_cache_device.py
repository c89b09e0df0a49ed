from __future__ import annotations

import threading

import pytest

from models.cache import ModelCache
from models.device import dtype_for, pick_device
from models.errors import ModelConfigError


class Blob:
    """A stand-in value with a known size (the cache only needs nbytes/unload)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.unloaded = False

    def nbytes(self) -> int:
        return self.n

    def unload(self) -> None:
        self.unloaded = True


def test_lru_evicts_least_recently_used_over_budget() -> None:
    cache = ModelCache(memory_budget_bytes=100)
    a = cache.get("a", lambda: Blob(40))
    cache.get("b", lambda: Blob(40))
    cache.get("a", lambda: Blob(40))  # hit: a becomes most recent
    cache.get("c", lambda: Blob(40))  # 120 > 100: evict b
    assert cache.keys() == ["a", "c"]
    assert cache.evictions == ["b"]
    assert cache.used_bytes == 80
    assert cache.load_counts == {"a": 1, "b": 1, "c": 1}
    assert not a.unloaded
    cache.get("b", lambda: Blob(40))  # reload b: evicts a
    assert cache.load_count("b") == 2 and a.unloaded


def test_oversized_model_is_kept_alone() -> None:
    cache = ModelCache(memory_budget_bytes=10)
    cache.get("small", lambda: Blob(5))
    cache.get("huge", lambda: Blob(50))
    assert cache.keys() == ["huge"]


def test_concurrent_misses_load_once() -> None:
    cache = ModelCache(memory_budget_bytes=1000)
    started = threading.Event()

    def slow() -> Blob:
        started.set()
        threading.Event().wait(0.05)
        return Blob(1)

    threads = [threading.Thread(target=cache.get, args=("m", slow)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.load_count("m") == 1


def test_budget_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_MODEL_MEMORY_BYTES", "1234")
    assert ModelCache().memory_budget_bytes == 1234


def test_device_selection(models_env) -> None:
    import torch

    auto = pick_device()
    assert auto == ("cuda" if torch.cuda.is_available() else "cpu")
    models_env.setenv("TOLLGATE_DEVICE", "cpu")
    assert pick_device() == "cpu"
    assert dtype_for("cpu") == torch.float32
    assert dtype_for("cuda") == torch.float16
    with pytest.raises(ModelConfigError):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelConfigError, match="CUDA"):
            pick_device("cuda")
