"""Fixtures for the model-layer tests: the tiny kit is built once per session.

The kit itself (``models_kit_dir``) is built once per session by the root conftest, and
shared with the end-to-end worker tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def models_registry_path(models_kit_dir: Path) -> Path:
    return models_kit_dir / "models.toml"


@pytest.fixture(scope="session")
def models_registry(models_registry_path: Path):  # type: ignore[no-untyped-def]
    from models.registry import load_registry

    return load_registry(models_registry_path)


@pytest.fixture(scope="session")
def models_manager(models_registry):  # type: ignore[no-untyped-def]
    """One manager (own cache, CPU) shared by the whole session, like a worker process."""
    from models.cache import ModelCache
    from models.manager import ModelManager

    return ModelManager(models_registry, cache=ModelCache(16 * 1024**3), device="cpu")


@pytest.fixture()
def models_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv("TOLLGATE_MODELS", raising=False)
    monkeypatch.delenv("TOLLGATE_DEVICE", raising=False)
    yield monkeypatch
