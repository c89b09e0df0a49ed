"""The fault schedule: which process is killed or cut when, and what each fault hit."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg

from bench.ledger import libpq_url
from bench.soak.processes import Proc, children_of, wait_port

CHILD_KILL_EVERY_S = 12.0


@dataclass
class Chaos:
    """The fault schedule and what it measured."""

    db_url: str
    api_url: str
    workers: list[Proc]
    intake: Proc
    redis_proc: Proc
    redis_port: int
    keys: dict[str, str]
    rng: random.Random
    log: list[str] = field(default_factory=list)
    # (kill time as wall clock, job ids that the killed worker was running)
    kills: list[tuple[float, list[str]]] = field(default_factory=list)
    http_codes: dict[int, int] = field(default_factory=dict)
    main_kill_jobs: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {text}"
        self.log.append(line)
        print(line, flush=True)

    def running_on(self, worker: Proc) -> list[str]:
        """The job this worker's only pool process runs now (-c 1): its latest start."""
        node = worker.name
        with psycopg.connect(libpq_url(self.db_url), autocommit=True, connect_timeout=5) as c:
            rows = c.execute(
                "SELECT id FROM jobs WHERE status = 'running' AND worker LIKE %s"
                " ORDER BY started_at DESC LIMIT 1",
                (node + "@%",),
            ).fetchall()
        return [r[0] for r in rows]

    def kill_child(self) -> None:
        worker = self.rng.choice(self.workers)
        kids = children_of(worker.pid)
        if not kids:
            return
        running = self._try(lambda: self.running_on(worker), [])
        os.kill(kids[0], signal.SIGKILL)
        self.kills.append((time.time(), running))
        self.note(f"SIGKILL {worker.name} pool child {kids[0]} (running {running})")

    def kill_worker_main(self) -> None:
        worker = self.workers[0]
        kids = children_of(worker.pid)
        running = self._try(lambda: self.running_on(worker), [])
        worker.kill()
        for kid in kids:  # a node loss takes the pool with it
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
        self.kills.append((time.time(), running))
        self.main_kill_jobs.extend(running)
        self.note(f"SIGKILL {worker.name} main process (running {running}); restarting")
        worker.start()

    def kill_intake(self) -> None:
        self.intake.kill()
        self.note("SIGKILL intake; restarting")
        self.intake.start()

    def kill_redis(self) -> None:
        self.redis_proc.kill()
        self.note("SIGKILL redis; restarting in 1 s")
        time.sleep(1.0)
        self.redis_proc.start()
        wait_port(self.redis_port)
        self.note("redis back")

    def kill_connections(self) -> None:
        def work() -> int:
            with psycopg.connect(libpq_url(self.db_url), autocommit=True, connect_timeout=5) as c:
                row = c.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()
            return int(row[0]) if row else 0

        self.note(f"pg_terminate_backend: {self._try(work, -1)} connections")

    def cancel_some(self) -> None:
        def pick() -> list[tuple[str, str]]:
            with psycopg.connect(libpq_url(self.db_url), autocommit=True, connect_timeout=5) as c:
                return c.execute(
                    "SELECT id, account_id FROM jobs WHERE status IN"
                    " ('queued', 'dispatched', 'running') ORDER BY random() LIMIT 2"
                ).fetchall()

        for job_id, account in self._try(pick, []):
            code = self.http("POST", f"/v1/jobs/{job_id}/cancel", account)
            self.note(f"cancel {job_id}: HTTP {code}")

    def http(self, method: str, path: str, account: str) -> int:
        headers = {"Authorization": f"Bearer {self.keys[account]}"}
        try:
            code = httpx.request(method, self.api_url + path, headers=headers, timeout=15)
            status = code.status_code
        except httpx.HTTPError:
            status = 0  # the API process itself did not answer
        self.http_codes[status] = self.http_codes.get(status, 0) + 1
        return status

    def _try(self, fn: Any, default: Any) -> Any:
        try:
            return fn()
        except Exception as exc:  # a fault of our own making (redis restarting, ...)
            self.note(f"  ({fn.__name__ if hasattr(fn, '__name__') else 'step'} failed: {exc})")
            return default

    def schedule(self, window_s: float) -> list[tuple[float, str]]:
        events: list[tuple[float, str]] = []
        t = 6.0
        while t < window_s:
            events.append((t + self.rng.uniform(-2, 2), "kill_child"))
            t += CHILD_KILL_EVERY_S
        events.append((window_s * 0.45, "kill_worker_main"))
        events.append((window_s * 0.25, "kill_intake"))
        events.append((window_s * 0.6, "kill_redis"))
        for _ in range(self.rng.randint(4, 6)):
            events.append((self.rng.uniform(3, window_s), "kill_connections"))
        for frac in (0.3, 0.5, 0.8):
            events.append((window_s * frac, "cancel_some"))
        return sorted(events)

    def run(self, window_s: float, stop: threading.Event) -> None:
        for at, action in self.schedule(window_s):
            delay = self.started + at - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            getattr(self, action)()
