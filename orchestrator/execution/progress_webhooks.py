"""`progress` webhooks from a running attempt: best effort (like progress events), at most one
every PROGRESS_WEBHOOK_INTERVAL_S per job, published straight to the callback task (progress
is not worth an outbox row; start and completed go through the outbox)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.jobs import webhooks
from orchestrator.jobs.records import get_row, view
from orchestrator.scheduling.outbox import Publisher


class ProgressWebhooks:
    def __init__(self, engine: Engine, publish: Publisher, job_id: str) -> None:
        self.engine, self.publish, self.job_id = engine, publish, job_id
        self._wanted: bool | None = None
        self._last_sent = float("-inf")

    def __call__(self, step: int, total: int) -> bool:
        """Send a progress webhook if the job asks for them and the interval has passed."""
        if self._wanted is False:
            return False
        now = time.monotonic()
        if now - self._last_sent < webhooks.PROGRESS_WEBHOOK_INTERVAL_S:
            return False
        row: Any = run_transaction(self.engine, lambda c: get_row(c, None, self.job_id))
        self._wanted = webhooks.wants(row, "progress")
        if not self._wanted:
            return False
        self._last_sent = now
        self.publish("callback", webhooks.message(row, "progress", view(row), utcnow(), step))
        return True
