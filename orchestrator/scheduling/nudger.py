"""The API's nudges, off the request path: one background thread per process runs
`scheduler.nudge` (a dispatch pass, then the outbox relay) for the jobs submitted since its
last pass, so a request ends at its own commit and a burst of submits costs one dispatch
and one relay per wakeup, not one per job.

Nothing depends on it: a submit's job row, hold, queue entry and outbox rows are committed
before the 202, and beat's periodic dispatcher and re-publisher send whatever a crash, a
full queue (`PENDING_MAX` job ids) or a failed pass left behind. The thread starts at the
first `poke` in each process (so it survives a fork) and `stop` runs a last pass."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from sqlalchemy import Engine

from orchestrator.scheduling import scheduler
from orchestrator.scheduling.outbox import relay_quietly

log = logging.getLogger(__name__)

PENDING_MAX: Final = 10_000  # job ids waiting for a pass; beyond that beat sends them
PASS_IDS_MAX: Final = 64  # job ids one pass relays (the relay reads at most 200 rows)
# Passes start at most this often, so a burst of submits shares one (a dispatch delay of
# a few ms against a GPU job's seconds).
PASS_INTERVAL_S: Final = 0.02
STOP_TIMEOUT_S: Final = 10.0
CHORES_MAX: Final = 64  # deferred calls waiting for the thread; beyond, dropped (metrics)

Nudge = Callable[[Engine, Any, list[str]], Any]
Relay = Callable[[Engine, Any, list[str]], Any]


class Nudger:
    """`poke(job_id)` from any thread; one thread runs the passes. `engine` and `publish`
    are factories, resolved at each pass (the process's cached engine and publisher)."""

    def __init__(
        self,
        engine: Callable[[], Engine],
        publish: Callable[[], Any],
        *,
        nudge: Nudge = scheduler.nudge,
        relay: Relay = relay_quietly,
        pending_max: int = PENDING_MAX,
        pass_ids_max: int = PASS_IDS_MAX,
        pass_interval_s: float = PASS_INTERVAL_S,
    ) -> None:
        self._engine = engine
        self._publish = publish
        self._nudge = nudge
        self._relay = relay
        self.pending_max = max(1, pending_max)
        self.pass_ids_max = max(1, pass_ids_max)
        self.pass_interval_s = max(0.0, pass_interval_s)
        self._last_pass_at = 0.0
        self._pending: dict[str, None] = {}  # insertion-ordered set
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._busy = False
        self._wanted = False  # a pass is asked for (with ids or not)
        self._dispatch = False  # ... and it is to dispatch (not only relay)
        self._lazy_since: float | None = None  # the first relay-only poke waiting
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._chores: list[Callable[[], Any]] = []
        self.passes = 0
        self.dropped = 0  # ids not queued (full): beat dispatches and relays them
        self.dropped_chores = 0

    def poke(self, job_ids: str | Iterable[str] = ()) -> None:
        """Ask for a pass covering `job_ids` (and a dispatch pass in any case)."""
        self._ask(job_ids, dispatch=True)

    def relay(self, job_ids: str | Iterable[str]) -> None:
        """Ask for `job_ids`' outbox rows to be relayed, without a dispatch pass of its own:
        it waits up to one pass interval, so a job's end that follows its start within it
        (a short job) shares one pass, with one relay transaction for both."""
        self._ask(job_ids, dispatch=False)

    def defer(self, chore: Callable[[], Any]) -> bool:
        """Run `chore` on this nudger's thread before its next pass, off the caller's path
        (best effort, for estimates and metrics: a failure is logged, a full list drops it:
        False)."""
        with self._lock:
            if self._stopping or len(self._chores) >= CHORES_MAX:
                self.dropped_chores += 1
                return False
            self._chores.append(chore)
            return True

    def _run_chores(self) -> None:
        with self._lock:
            chores, self._chores = self._chores, []
        for chore in chores:
            try:
                chore()
            except Exception:
                log.debug("deferred chore failed", exc_info=True)

    def _ask(self, job_ids: str | Iterable[str], *, dispatch: bool) -> None:
        ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
        with self._lock:
            if self._stopping:
                return
            for job_id in ids:
                if len(self._pending) < self.pending_max:
                    self._pending[job_id] = None
                else:
                    self.dropped += 1
            self._wanted = True
            if dispatch:
                self._dispatch = True
            elif self._lazy_since is None:
                self._lazy_since = time.monotonic()
            self._ensure_thread()
            self._wake.notify_all()  # not notify(): a flush() may be waiting on it too

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="tollgate-nudger", daemon=True)
        self._thread.start()

    def _next(self) -> tuple[list[str], bool] | None:
        """Wait for work; the ids of the next pass and whether it dispatches, or None to
        stop."""
        with self._lock:
            self._busy = False
            self._wake.notify_all()
            while not self._wanted and not self._stopping:
                self._wake.wait()
            if not self._wanted:
                return None
            # Let the pokes of the next few ms join this pass (a stop does not wait).
            while not self._stopping:
                start_at = self._last_pass_at
                if not self._dispatch and self._lazy_since is not None:
                    start_at = max(start_at, self._lazy_since)  # a relay waits for company
                left = start_at + self.pass_interval_s - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            self._last_pass_at = time.monotonic()
            ids = list(self._pending)[: self.pass_ids_max]
            for job_id in ids:
                del self._pending[job_id]
            dispatch = self._dispatch
            self._wanted = bool(self._pending)
            self._dispatch = False
            self._lazy_since = self._last_pass_at if self._pending else None
            self._busy = True
            return ids, dispatch

    def _run(self) -> None:
        while (work := self._next()) is not None:
            ids, dispatch = work
            self._run_chores()
            try:
                if dispatch:
                    self._nudge(self._engine(), self._publish(), ids)
                else:
                    self._relay(self._engine(), self._publish(), ids)
            except Exception:  # nudge logs its own failures; this is a last guard
                log.warning("nudge pass failed; beat will dispatch and relay", exc_info=True)
            self.passes += 1

    def flush(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """Wait until every poke so far has had its pass (True) or `timeout_s` passed."""
        with self._lock:
            return self._wake.wait_for(
                lambda: not (self._wanted or self._busy) or self._thread is None, timeout_s
            )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Run the passes asked for so far, then end the thread."""
        self.flush(timeout_s)
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
