"""Per-process warm cache of loaded models.

An LRU keyed by model id (or any string), bounded by a memory budget in bytes. Each
value's size is measured once, when it is loaded. Loads are counted per key so a
worker (and the tests) can check that a model is loaded once across consecutive jobs.

The budget is ``memory_budget_bytes`` or ``$TOLLGATE_MODEL_MEMORY_BYTES`` (default
8 GiB). A single model larger than the budget is still kept (alone): refusing to run
would be worse than exceeding the budget.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

log = logging.getLogger(__name__)

ENV_BUDGET = "TOLLGATE_MODEL_MEMORY_BYTES"
DEFAULT_BUDGET = 8 * 1024**3

T = TypeVar("T")


@runtime_checkable
class Sized(Protocol):
    def nbytes(self) -> int: ...


@runtime_checkable
class Unloadable(Protocol):
    def unload(self) -> None: ...


def module_nbytes(modules: Iterable[Any]) -> int:
    """Bytes held by the parameters and buffers of torch modules (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for mod in modules:
        if mod is None or not hasattr(mod, "parameters"):
            continue
        tensors = list(mod.parameters()) + list(mod.buffers())
        for t in tensors:
            key = t.data_ptr()
            if key in seen or key == 0:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def estimate_nbytes(obj: Any) -> int:
    """Size of a cached value: ``obj.nbytes()`` if it has one, else torch modules in it."""
    if isinstance(obj, Sized):
        return int(obj.nbytes())
    if hasattr(obj, "parameters"):
        return module_nbytes([obj])
    return 0


@dataclass
class _Slot:
    value: Any
    nbytes: int


class ModelCache:
    """Thread-safe LRU of loaded models bounded by ``memory_budget_bytes``."""

    def __init__(self, memory_budget_bytes: int | None = None) -> None:
        if memory_budget_bytes is None:
            memory_budget_bytes = int(os.environ.get(ENV_BUDGET, DEFAULT_BUDGET))
        if memory_budget_bytes <= 0:
            raise ValueError("memory_budget_bytes must be positive")
        self.memory_budget_bytes = memory_budget_bytes
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._lock = threading.RLock()
        self._key_locks: dict[str, threading.Lock] = {}
        self.load_counts: dict[str, int] = {}
        self.evictions: list[str] = []

    # ------------------------------------------------------------------ queries
    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._slots

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._slots)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._slots.values())

    def load_count(self, key: str) -> int:
        with self._lock:
            return self.load_counts.get(key, 0)

    # ------------------------------------------------------------------ get/put
    def get(self, key: str, loader: Callable[[], T]) -> T:
        """Return the cached value for ``key``, calling ``loader()`` on a miss.

        Concurrent misses for the same key load once; other keys are not blocked
        while a model loads.
        """
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                self._slots.move_to_end(key)
                return slot.value  # type: ignore[no-any-return]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                slot = self._slots.get(key)
                if slot is not None:
                    self._slots.move_to_end(key)
                    return slot.value  # type: ignore[no-any-return]
            value = loader()
            size = estimate_nbytes(value)
            with self._lock:
                self.load_counts[key] = self.load_counts.get(key, 0) + 1
                self._slots[key] = _Slot(value, size)
                self._slots.move_to_end(key)
                self._evict_over_budget(keep=key)
            log.info("loaded model %s (%.1f MiB)", key, size / 2**20)
            return value

    def _evict_over_budget(self, keep: str) -> None:
        while self.used_bytes > self.memory_budget_bytes:
            victim = next((k for k in self._slots if k != keep), None)
            if victim is None:
                log.warning(
                    "model %s alone (%d bytes) exceeds the cache budget (%d bytes)",
                    keep,
                    self._slots[keep].nbytes,
                    self.memory_budget_bytes,
                )
                return
            self._drop(victim)

    def _drop(self, key: str) -> None:
        slot = self._slots.pop(key)
        self.evictions.append(key)
        log.info("evicted model %s (%.1f MiB)", key, slot.nbytes / 2**20)
        if isinstance(slot.value, Unloadable):
            try:
                slot.value.unload()
            except Exception:  # pragma: no cover - best effort
                log.exception("unloading %s failed", key)

    def evict(self, key: str) -> bool:
        with self._lock:
            if key not in self._slots:
                return False
            self._drop(key)
            return True

    def clear(self) -> None:
        with self._lock:
            for key in list(self._slots):
                self._drop(key)


_default: ModelCache | None = None
_default_lock = threading.Lock()


def default_cache() -> ModelCache:
    """The process-wide cache (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ModelCache()
        return _default
