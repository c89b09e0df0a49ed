"""The Redis streams of the intake and their bounds: `tollgate:jobs` (job requests, read by
the consumer group `tollgate-intake`) and `tollgate:jobs:dead` (refusals with their reason).
Clients, metrics and probes import the names from here without the consumer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

JOBS_STREAM: Final = "tollgate:jobs"
DEAD_STREAM: Final = "tollgate:jobs:dead"
GROUP: Final = "tollgate-intake"
DEAD_MAXLEN: Final = 100_000

BATCH_SIZE_MAX: Final = 100
BLOCK_MS_MAX: Final = 10_000
MAX_DELIVERIES_MAX: Final = 100
BACKOFF_MAX_S: Final = 30.0


@dataclass(frozen=True)
class IntakeConfig:
    batch_size: int = 16
    block_ms: int = 2_000
    claim_min_idle_ms: int = 30_000
    claim_count: int = 16
    claim_interval_s: float = 5.0
    max_deliveries: int = 5
    backoff_initial_s: float = 0.5
    backoff_max_s: float = BACKOFF_MAX_S
    stream: str = JOBS_STREAM
    dead_stream: str = DEAD_STREAM
    group: str = GROUP
    dead_maxlen: int = DEAD_MAXLEN

    def __post_init__(self) -> None:
        bounds = {
            "batch_size": (self.batch_size, 1, BATCH_SIZE_MAX),
            "block_ms": (self.block_ms, 1, BLOCK_MS_MAX),
            "claim_count": (self.claim_count, 1, BATCH_SIZE_MAX),
            "max_deliveries": (self.max_deliveries, 1, MAX_DELIVERIES_MAX),
            "claim_min_idle_ms": (self.claim_min_idle_ms, 0, 24 * 3600 * 1000),
        }
        for name, (value, lo, hi) in bounds.items():
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s <= BACKOFF_MAX_S:
            raise ValueError(f"need 0 < backoff_initial_s <= backoff_max_s <= {BACKOFF_MAX_S}")
