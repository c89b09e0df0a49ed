"""The worker's side of a lease: a daemon thread that renews the running attempt's lease on a
timer, independent of the runner's progress, so a long model call keeps its job.

A renewal is one small UPDATE guarded by the attempt's lease token, committed without waiting
for the WAL flush (losing one only shortens the lease). A renewal that fails (a database
blip) is retried at the next tick; one that finds the token gone (the sweep took the job
back, or another attempt owns it) stops the heartbeat and marks it lost: the runner then
stops at its next progress call (JobStopped "superseded").
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Connection, Engine, update

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.db import commit_without_flush_wait
from orchestrator.execution.leases import LEASED, lease_expiry
from orchestrator.settings import get_settings
from orchestrator.tables import jobs

log = logging.getLogger(__name__)


def renew(engine: Engine, job_id: str, token: str) -> bool:
    """Extend the lease by the TTL from now. False: the token no longer holds the job."""

    def work(conn: Connection) -> bool:
        commit_without_flush_wait(conn)
        result = conn.execute(
            update(jobs)
            .where(
                jobs.c.id == job_id,
                jobs.c.lease_token == token,
                jobs.c.status.in_(sorted(LEASED)),
            )
            .values(lease_expires_at=lease_expiry(utcnow()))
        )
        return result.rowcount == 1

    return run_transaction(engine, work)


class Heartbeat:
    """Renews one attempt's lease every `interval_s` until stopped or lost."""

    def __init__(self, engine: Engine, job_id: str, token: str, interval_s: float) -> None:
        self.engine, self.job_id, self.token, self.interval_s = engine, job_id, token, interval_s
        self.lost = threading.Event()
        self.renewals = 0
        # time.monotonic() until which the lease is surely held (begin's TTL, then each
        # renewal's): a worker retrying `finish` through an outage may keep trying until then.
        self.held_until = time.monotonic() + get_settings().lease_ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        # Bounded: a renewal stuck on the database must not hold up the task's return.
        self._thread.join(timeout=self.interval_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            started = time.monotonic()
            try:
                held = renew(self.engine, self.job_id, self.token)
            except Exception:
                log.warning("lease renewal of job %s failed; retrying", self.job_id, exc_info=True)
                continue
            if not held:
                log.warning("job %s: lease lost (taken back or superseded)", self.job_id)
                self.lost.set()
                return
            self.renewals += 1
            self.held_until = started + get_settings().lease_ttl_s
