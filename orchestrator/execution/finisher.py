"""A worker process's finisher: one thread that applies its jobs' results (`finish`, a durable
transaction that waits for its WAL flush) while the process's task thread takes its next job.

Why: a pool child that waits for `finish` to commit is idle for that wait (the job's row and
balance locks, the WAL flush): 3-4 ms per job, a third of a short job's cycle. Handed to this
thread, the flush overlaps the next job's `begin` and render; the money still moves only in
a transaction that waited for its flush.

What makes it safe (docs/architecture.md, "The finisher"):
- The lease stays held until the result is applied: the heartbeat is stopped by the handed
  work, after `finish`, never by the task.
- The Celery message is acknowledged when the task returns, before `finish` commits. If the
  process dies in between, the job is still `running` under its lease; the heartbeat dies
  with the process, the lease lapses and the lease sweep dispatches the job again as a new
  attempt on the same hold. A job is never charged twice (`finish` applies only the current
  attempt) and never stranded (the sweep).
- At most PENDING_MAX results wait: a task that would exceed it waits for room (the task
  thread then runs at the finisher's pace, as before), so a slow database never piles up
  finished work in memory.
- A process's shutdown (`drain`) applies what is waiting first, for up to a bound; what is
  left then is recovered by the lease sweep, like a crash.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger(__name__)

# A job task's answer when its result was handed here: the job's status is known once the
# finisher has applied it.
FINISHING: Final = "finishing"
PENDING_MAX: Final = 2  # results handed over and not yet applied, per process
DRAIN_TIMEOUT_S: Final = 30.0
# A task waits this long at most for room; then it applies its own result (as with no
# finisher), so a finisher that stopped making progress never blocks its process forever.
HAND_WAIT_MAX_S: Final = 300.0

Work = Callable[[], Any]


class Finisher:
    """`hand(work)` from the task thread; this object's one thread runs each `work` in
    order. `work` does its own error handling; an exception escaping it is logged."""

    def __init__(self, pending_max: int = PENDING_MAX) -> None:
        self.pending_max = max(1, pending_max)
        self._queue: deque[Work] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.applied = 0
        self.waits = 0  # hands that waited for room

    def hand(self, work: Work) -> None:
        """Queue `work`; waits (up to HAND_WAIT_MAX_S) while PENDING_MAX are already waiting.
        After `stop`, or when no room came in time, runs it on the caller's thread."""
        with self._cond:
            if not self._stopping:
                self._ensure_thread()
                if len(self._queue) >= self.pending_max:
                    self.waits += 1
                    self._cond.wait_for(
                        lambda: len(self._queue) < self.pending_max or self._stopping,
                        HAND_WAIT_MAX_S,
                    )
            if not self._stopping and len(self._queue) < self.pending_max:
                self._queue.append(work)
                self._cond.notify_all()
                return
        _run_one(work)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="tollgate-finisher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: bool(self._queue) or self._stopping)
                if not self._queue:
                    return  # stopping, nothing left
                work = self._queue.popleft()
                self._busy = True
                self._cond.notify_all()  # room for a waiting hand
            _run_one(work)
            self.applied += 1

    def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Wait until every result handed so far is applied (True) or `timeout_s` passed."""
        with self._cond:
            if self._thread is None or self._pid != os.getpid():
                return not self._queue
            return self._cond.wait_for(lambda: not (self._queue or self._busy), timeout_s)

    def stop(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Apply what is waiting (up to `timeout_s`), then end the thread; later hands run
        inline. False when results were left (the lease sweep recovers their jobs)."""
        done = self.drain(timeout_s)
        with self._cond:
            self._stopping = True
            left = len(self._queue)
            self._cond.notify_all()
        if left:
            log.warning(
                "finisher stopped with %d results unapplied; the lease sweep runs them", left
            )
        return done


def _run_one(work: Work) -> None:
    try:
        work()
    except Exception:
        log.exception("applying a job's result failed; its lease will lapse and be swept")


_finishers: dict[int, Finisher] = {}
_finishers_lock = threading.Lock()


def process_finisher() -> Finisher:
    """This process's finisher (a forked pool child makes its own: threads do not survive
    a fork)."""
    pid = os.getpid()
    with _finishers_lock:
        finisher = _finishers.get(pid)
        if finisher is None:
            _finishers.clear()
            finisher = _finishers[pid] = Finisher()
        return finisher


def current_finisher() -> Finisher | None:
    """This process's finisher if one was made in it (for shutdown hooks)."""
    with _finishers_lock:
        return _finishers.get(os.getpid())
