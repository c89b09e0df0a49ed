"""What the soak checks in the database: jobs ended, credits accounted for."""

from __future__ import annotations

import statistics
import time
from typing import Any

import redis
from sqlalchemy import func, select

from billing import ledger
from billing.db import run_transaction
from billing.tables import holds
from orchestrator.ingress.streams import JOBS_STREAM
from orchestrator.jobs.states import TERMINAL
from orchestrator.tables import jobs

SETTLE_POLL_S = 1.0


def count_terminal(engine: Any) -> tuple[int, int]:
    def work(c: Any) -> tuple[int, int]:
        total = c.execute(select(func.count()).select_from(jobs)).scalar_one()
        done = c.execute(
            select(func.count()).select_from(jobs).where(jobs.c.status.in_(sorted(TERMINAL)))
        ).scalar_one()
        return int(total), int(done)

    return run_transaction(engine, work)


def wait_settled(engine: Any, redis_port: int, settle_s: float) -> None:
    """Until the stream is drained and every job has ended, for `settle_s` at most."""
    deadline = time.monotonic() + settle_s
    client = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=5)
    while time.monotonic() < deadline:
        total, done = count_terminal(engine)
        backlog = client.xlen(JOBS_STREAM)
        if backlog == 0 and total == done:
            break
        time.sleep(SETTLE_POLL_S)


def drift(engine: Any, granted: dict[str, int]) -> tuple[int, list[str]]:
    """Credits unaccounted for: per account, granted - available - held must equal the sum
    charged on its jobs; a terminal job must hold nothing."""

    def work(c: Any) -> tuple[int, list[str]]:
        total, notes = 0, []
        for account, amount in granted.items():
            bal = ledger.get_balance(c, account, "image")
            charged = c.execute(
                select(func.coalesce(func.sum(jobs.c.charged), 0)).where(
                    jobs.c.account_id == account
                )
            ).scalar_one()
            off = amount - bal.available - bal.held - int(charged)
            if off:
                notes.append(f"{account}: {off:+d}")
            total += abs(off)
        open_on_terminal = c.execute(
            select(func.count())
            .select_from(holds.join(jobs, jobs.c.id == holds.c.reference))
            .where(holds.c.status == "open", jobs.c.status.in_(sorted(TERMINAL)))
        ).scalar_one()
        if open_on_terminal:
            notes.append(f"{open_on_terminal} open hold(s) on ended jobs")
            total += int(open_on_terminal)
        return total, notes

    return run_transaction(engine, work)


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]
