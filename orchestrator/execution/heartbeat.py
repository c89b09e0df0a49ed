"""The worker's side of a lease: a daemon thread that renews the running attempt's lease on a
timer, independent of the runner's progress, so a long model call keeps its job. One renewer
thread per process serves all its heartbeats.

A renewal is one small UPDATE guarded by the attempt's lease token, committed without waiting
for the WAL flush (losing one only shortens the lease). A renewal that fails (a database
blip) is retried at the next tick; one that finds the token gone (the sweep took the job
back, or another attempt owns it) stops the heartbeat and marks it lost: the runner then
stops at its next progress call (JobStopped "superseded").
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Final

from sqlalchemy import Connection, Engine, update

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.db import commit_without_flush_wait
from orchestrator.errors import OrchestratorError
from orchestrator.execution.leases import LEASED, lease_expiry
from orchestrator.settings import get_settings
from orchestrator.tables import jobs

log = logging.getLogger(__name__)

HEARTBEATS_MAX: Final = 1024  # leases one process renews at once


class TooManyLeases(OrchestratorError):
    """One process was asked to renew more than HEARTBEATS_MAX leases at once."""


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
    """Renews one attempt's lease every `interval_s` until stopped or lost. Every heartbeat
    of a process is served by that process's one renewer thread (`_Renewer`): starting and
    stopping one costs no thread start or join on the job's path."""

    def __init__(self, engine: Engine, job_id: str, token: str, interval_s: float) -> None:
        self.engine, self.job_id, self.token, self.interval_s = engine, job_id, token, interval_s
        self.lost = threading.Event()
        self.renewals = 0
        # time.monotonic() until which the lease is surely held (begin's TTL, then each
        # renewal's): a worker retrying `finish` through an outage may keep trying until then.
        self.held_until = time.monotonic() + get_settings().lease_ttl_s
        self.due_at = time.monotonic() + interval_s  # the next renewal (the renewer's clock)
        self.stopped = False

    def start(self) -> Heartbeat:
        _renewer().add(self)
        return self

    def stop(self) -> None:
        """Stop renewing (at once: a renewal under way may still land; it extends a lease
        that the token still holds, or changes nothing)."""
        self.stopped = True
        _renewer().discard(self)

    def renew_once(self) -> None:
        """One renewal, on the renewer's thread; a failure is retried at the next tick."""
        started = time.monotonic()
        self.due_at = started + self.interval_s
        try:
            held = renew(self.engine, self.job_id, self.token)
        except Exception:
            log.warning("lease renewal of job %s failed; retrying", self.job_id, exc_info=True)
            return
        if not held:
            log.warning("job %s: lease lost (taken back or superseded)", self.job_id)
            self.lost.set()
            self.stop()
            return
        self.renewals += 1
        self.held_until = started + get_settings().lease_ttl_s


class _Renewer:
    """One daemon thread per process that renews its running attempts' leases, each when its
    interval is up (a prefork child runs one job at a time: one heartbeat; a thread pool as
    many as its threads). At most HEARTBEATS_MAX at once (a heartbeat beyond it raises)."""

    def __init__(self) -> None:
        self._beats: dict[int, Heartbeat] = {}
        self._wake = threading.Condition()
        # When the thread wakes next on its own (inf: only when told; -inf: it is renewing
        # and looks at every heartbeat again after): `add` wakes it only for an earlier due
        # time, so a job's start costs no thread wakeup.
        self._sleep_until = -math.inf
        self._thread = threading.Thread(target=self._run, name="lease-renewer", daemon=True)
        self._thread.start()

    def add(self, beat: Heartbeat) -> None:
        with self._wake:
            if len(self._beats) >= HEARTBEATS_MAX:
                raise TooManyLeases(f"more than {HEARTBEATS_MAX} leases held in one process")
            self._beats[id(beat)] = beat
            if beat.due_at < self._sleep_until:
                self._wake.notify()

    def discard(self, beat: Heartbeat) -> None:
        with self._wake:
            self._beats.pop(id(beat), None)

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                due = [b for b in self._beats.values() if b.due_at <= now]
                if not due:
                    next_at = min((b.due_at for b in self._beats.values()), default=math.inf)
                    self._sleep_until = next_at
                    self._wake.wait(None if next_at == math.inf else next_at - now)
                    self._sleep_until = -math.inf
                    continue
            for beat in due:  # outside the lock: a start or stop never waits for a renewal
                if not beat.stopped:
                    beat.renew_once()


_renewers: dict[int, _Renewer] = {}
_renewers_lock = threading.Lock()


def _renewer() -> _Renewer:
    """This process's renewer, made at its first heartbeat (a forked pool child makes its
    own: threads do not survive a fork)."""
    pid = os.getpid()
    with _renewers_lock:
        renewer = _renewers.get(pid)
        if renewer is None:
            _renewers.clear()  # a parent's, copied by fork, without its thread
            renewer = _renewers[pid] = _Renewer()
        return renewer
