"""Leases end to end: real PostgreSQL, Redis, Celery worker processes and beat, with short
lease settings (TTL 3 s, renewed every 1 s, swept every 1 s).

A worker whose main process is SIGKILLed (its pool child dies with it) stops renewing; the
sweep dispatches the job again to another worker, which runs it as a new attempt on the same
hold. The dead worker's own message, redelivered later, is a no-op."""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy import Engine, select, update

from billing import ledger
from billing.clock import utcnow
from billing.db import run_transaction
from billing.verify import verify
from orchestrator.execution import protocol as execution
from orchestrator.execution.heartbeat import Heartbeat
from orchestrator.jobs import service as jobs
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.settlement import lease_sweep
from orchestrator.storage import Storage
from orchestrator.tables import dispatch_queue
from orchestrator.tables import jobs as jobs_table
from tests.ledger_helpers import grant, new_account
from tests.lifecycle_helpers import available, results, row, submit, wait_terminal, wait_until
from tests.support.behaviours import GATE_KEY, tiny_png
from tests.support.services import celery_beat, celery_worker, kill, parent_pid, wait_for_pid

LEASE_ENV = {
    "TOLLGATE_LEASE_TTL_S": "3",
    "TOLLGATE_LEASE_RENEW_INTERVAL_S": "1",
    "TOLLGATE_LEASE_SWEEP_INTERVAL_S": "1",
}
TTL_S, SWEEP_S = 3.0, 1.0
# Recovery within TTL + one sweep, plus dispatch and the run (both well under a second here)
# and slack for a loaded 2-core test machine.
RECOVERY_BOUND_S = TTL_S + SWEEP_S + 6.0


def txt2img(test: str, num_images: int = 1) -> dict[str, Any]:
    return {
        "type": "txt2img",
        "prompt": f"test:{test}",
        "width": 512,
        "height": 512,
        "steps": 20,
        "num_images": num_images,
    }


class Workers:
    """Celery workers (-c 1) on every queue; killed ones are replaced on demand."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.stack = contextlib.ExitStack()
        self.running: dict[int, Any] = {}

    def ensure(self, count: int) -> None:
        for pid in [p for p, proc in self.running.items() if proc.poll() is not None]:
            del self.running[pid]
        while len(self.running) < count:
            proc = self.stack.enter_context(celery_worker(self.env, self.log_dir, concurrency=1))
            self.running[proc.pid] = proc

    def kill_holder(self, child_pid: int) -> None:
        """SIGKILL the main process of the worker whose pool child is `child_pid`."""
        main = parent_pid(child_pid)
        assert main in self.running, "the job ran on none of this module's workers"
        kill(main)
        self.running[main].wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the child dies with it (PDEATHSIG)
            try:
                parent_pid(child_pid)
            except FileNotFoundError:
                return
            time.sleep(0.05)
        raise AssertionError("the pool child outlived its worker")


@pytest.fixture(scope="module")
def lease_env(service_env: dict[str, str]) -> dict[str, str]:
    return {**service_env, **LEASE_ENV}


@pytest.fixture(scope="module")
def workers(
    lease_env: dict[str, str], settings_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    log_dir = tmp_path_factory.mktemp("lease-logs")
    pool = Workers(lease_env, log_dir)
    with pool.stack, celery_beat(lease_env, log_dir):
        pool.ensure(2)
        yield pool


@pytest.fixture
def account(pg_engine: Engine) -> str:
    acc = new_account(pg_engine)
    grant(pg_engine, acc, 20)
    return acc


def outcomes(job: dict[str, Any]) -> list[tuple[int, str | None]]:
    return [(a["number"], a["outcome"]) for a in job["attempts"]]


def expire_lease(engine: Engine, job_id: str) -> None:
    run_transaction(
        engine,
        lambda c: c.execute(
            update(jobs_table)
            .where(jobs_table.c.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        ),
    )


# --------------------------------------------------------------------- in process


def test_a_lost_heartbeat_stops_the_runner_at_its_next_step(
    pg_engine: Engine, storage: Storage, account: str
) -> None:
    job_id = jobs.submit(pg_engine, storage, account, txt2img("ok")).job["id"]
    attempt = execution.begin(pg_engine, job_id, "worker-a")
    assert attempt is not None
    first_expiry = row(pg_engine, job_id).lease_expires_at
    beat = Heartbeat(pg_engine, job_id, attempt.token, interval_s=0.05).start()
    ctx = execution.RunContext(pg_engine, storage, attempt, heartbeat=beat)
    try:
        wait_until(pg_engine, job_id, lambda r: r.lease_expires_at > first_expiry, timeout_s=5)
        assert beat.renewals >= 1 and beat.held_until > time.monotonic()
        taker = None
        for _ in range(50):  # the live heartbeat may renew between the two transactions
            expire_lease(pg_engine, job_id)
            taker = execution.begin(pg_engine, job_id, "worker-b")  # the old token is gone
            if taker is not None:
                break
        assert taker is not None
        deadline = time.monotonic() + 5
        while not beat.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(execution.JobStopped, match="superseded"):
            ctx.progress(1, 1)
    finally:
        beat.stop()
    execution.finish(pg_engine, taker, "failed", "test over")
    assert outcomes(jobs.get(pg_engine, account, job_id)) == [(1, "lease_expired"), (2, "failed")]


def test_a_process_renews_all_its_leases_on_one_thread(
    pg_engine: Engine, storage: Storage, account: str
) -> None:
    ids = [jobs.submit(pg_engine, storage, account, txt2img("ok")).job["id"] for _ in range(3)]
    attempts = [execution.begin(pg_engine, job_id, "worker-a") for job_id in ids]
    assert all(a is not None for a in attempts)
    expiry = {job_id: row(pg_engine, job_id).lease_expires_at for job_id in ids}
    beats = [
        Heartbeat(pg_engine, a.job_id, a.token, interval_s=0.05).start()
        for a in attempts
        if a is not None
    ]
    try:
        for job_id in ids:
            wait_until(pg_engine, job_id, lambda r, j=job_id: r.lease_expires_at > expiry[j])
        renewers = [t for t in threading.enumerate() if t.name == "lease-renewer"]
        assert len(renewers) == 1  # not a thread per job
    finally:
        for beat in beats:
            beat.stop()
    counts = [b.renewals for b in beats]
    time.sleep(0.3)  # stopped: no renewal after (one under way may still land)
    assert all(b.renewals - c <= 1 for b, c in zip(beats, counts, strict=True))
    for a in attempts:
        assert a is not None
        execution.finish(pg_engine, a, "failed", "test over")


def test_attempts_exhausted_fail_and_refund(
    pg_engine: Engine, storage: Storage, account: str
) -> None:
    job_id = jobs.submit(pg_engine, storage, account, txt2img("ok", num_images=2)).job["id"]
    for _ in range(execution.ATTEMPTS_MAX):
        assert execution.begin(pg_engine, job_id, "worker-a") is not None
        expire_lease(pg_engine, job_id)
        lease_sweep.sweep(pg_engine)  # (beat's sweep may get there first: same result)
        wait_until(pg_engine, job_id, lambda r: r.status != "running", timeout_s=5)
    done = row(pg_engine, job_id)
    assert (done.status, done.charged, done.refunded) == ("failed", 0, 2)
    assert "gave up after 3 attempts" in done.error
    assert outcomes(jobs.get(pg_engine, account, job_id)) == [
        (n, "lease_expired") for n in (1, 2, 3)
    ]
    hold = run_transaction(pg_engine, lambda c: ledger.get_hold(c, job_id))
    assert hold is not None and (hold.status, hold.committed) == ("released", 0)
    assert available(pg_engine, account) == 20


def test_a_tune_is_dispatched_again_in_the_phase_it_lost(
    pg_engine: Engine, storage: Storage, settings_env: None
) -> None:
    from orchestrator.tunes import service as tunes

    acc = new_account(pg_engine)
    grant(pg_engine, acc, 1, kind="tune")
    grant(pg_engine, acc, tunes.RENDER_IMAGES, kind="tune_image")
    spec = {
        "type": "tune",
        "name": "me",
        "subject": "woman",
        "images_b64": [base64.b64encode(tiny_png(i)).decode() for i in range(4)],
    }
    tune_id = jobs.submit(pg_engine, storage, acc, spec).job["id"]

    training = execution.begin(pg_engine, tune_id, "worker-a", tunes.TRAINING_PHASE)
    assert training is not None
    expire_lease(pg_engine, tune_id)
    lease_sweep.sweep(pg_engine)
    lost = row(pg_engine, tune_id)  # training goes back to the queue, holds untouched
    assert (lost.status, lost.lease_token, lost.attempt) == ("queued", None, 1)
    assert line_entry(pg_engine, tune_id) == ("queued", "tune")  # back in line
    training = execution.begin(pg_engine, tune_id, "worker-b", tunes.TRAINING_PHASE)
    assert training is not None and training.number == 2
    execution.finish(pg_engine, training, "succeeded", phase=tunes.TRAINING_PHASE)
    assert row(pg_engine, tune_id).status == "rendering"

    render = execution.begin(pg_engine, tune_id, "worker-b", tunes.RENDER_PHASE)
    assert render is not None
    expire_lease(pg_engine, tune_id)
    lease_sweep.sweep(pg_engine)
    lost = row(pg_engine, tune_id)  # the render stays rendering, without a lease
    assert (lost.status, lost.lease_token) == ("rendering", None)
    assert line_entry(pg_engine, tune_id) == ("queued", "tune_render")
    render = execution.begin(pg_engine, tune_id, "worker-c", tunes.RENDER_PHASE)
    assert render is not None and render.number == 2
    execution.finish(pg_engine, render, "failed", "test over", phase=tunes.RENDER_PHASE)

    done = row(pg_engine, tune_id)
    assert done.status == "failed"
    assert [
        (a["phase"], a["number"], a["outcome"])
        for a in jobs.get(pg_engine, acc, tune_id)["attempts"]
    ] == [
        ("training", 1, "lease_expired"),
        ("training", 2, "succeeded"),
        ("rendering", 1, "lease_expired"),
        ("rendering", 2, "failed"),
    ]
    tune_credits = run_transaction(pg_engine, lambda c: ledger.get_balance(c, acc, "tune"))
    images = run_transaction(pg_engine, lambda c: ledger.get_balance(c, acc, "tune_image"))
    assert (tune_credits.balance, tune_credits.held) == (0, 0)  # training charged once
    assert (images.available, images.held) == (tunes.RENDER_IMAGES, 0)  # render refunded
    assert run_transaction(pg_engine, verify) == []


def line_entry(engine: Engine, job_id: str) -> Any:
    """The job's place in the scheduler's line: (state, the family task that runs it)."""
    found = run_transaction(
        engine,
        lambda c: c.execute(
            select(dispatch_queue.c.state, dispatch_queue.c.task).where(
                dispatch_queue.c.job_id == job_id
            )
        ).first(),
    )
    return tuple(found) if found is not None else None


def test_lease_counters_count_what_the_sweep_did() -> None:
    from workers import metrics

    def value(name: str, family: str) -> float:
        return REGISTRY.get_sample_value(name, {"family": family}) or 0.0

    before = (
        value("tollgate_leases_expired_total", "upscale"),
        value("tollgate_jobs_redispatched_total", "upscale"),
    )
    metrics.count_recoveries(
        [
            lease_sweep.Recovery("job_a", "upscale", "redispatched"),
            lease_sweep.Recovery("job_b", "upscale", "canceled"),
        ]
    )
    assert value("tollgate_leases_expired_total", "upscale") == before[0] + 2
    assert value("tollgate_jobs_redispatched_total", "upscale") == before[1] + 1


# --------------------------------------------------------------------- real workers


def test_killed_worker_job_recovered_on_another_worker_and_charged_once(
    workers: Workers, pg_engine: Engine, storage: Storage, redis_url: str, account: str
) -> None:
    workers.ensure(2)
    job_id = submit(pg_engine, storage, redis_url, account, txt2img("gate", num_images=2))
    child = wait_for_pid(redis_url, job_id)
    first = row(pg_engine, job_id)
    assert (first.status, first.attempt) == ("running", 1)
    workers.kill_holder(child)
    killed_at = time.monotonic()
    redis.Redis.from_url(redis_url).set(GATE_KEY.format(job_id=job_id), 1, ex=600)

    done = wait_terminal(pg_engine, job_id, timeout_s=RECOVERY_BOUND_S + 10)
    took_s = time.monotonic() - killed_at
    assert took_s <= RECOVERY_BOUND_S, f"recovered in {took_s:.1f} s"
    assert (done.status, done.charged, done.refunded, done.attempt) == ("succeeded", 2, 0, 2)
    assert done.worker != first.worker  # another worker ran it
    view = jobs.get(pg_engine, account, job_id)
    assert outcomes(view) == [(1, "lease_expired"), (2, "succeeded")]
    assert view["attempts"][0]["worker"] == first.worker and view["attempts"][0]["ended_at"]
    assert [r.applied for r in results(pg_engine, job_id)] == [True]
    assert available(pg_engine, account) == 18

    # The dead worker's own message, redelivered hours later (visibility timeout): a no-op.
    Publisher(redis_url)("dispatch", {"job_id": job_id, "type": "txt2img"})
    marker = submit(pg_engine, storage, redis_url, account, txt2img("ok"))
    wait_terminal(pg_engine, marker)  # one worker left on the queue: the duplicate ran first
    assert row(pg_engine, job_id).attempt == 2
    assert outcomes(jobs.get(pg_engine, account, job_id)) == [
        (1, "lease_expired"),
        (2, "succeeded"),
    ]
    assert len(results(pg_engine, job_id)) == 1
    assert available(pg_engine, account) == 17
    assert run_transaction(pg_engine, verify) == []


def test_a_long_model_call_keeps_its_lease_and_a_duplicate_leaves_it_alone(
    workers: Workers, pg_engine: Engine, storage: Storage, redis_url: str, account: str
) -> None:
    workers.ensure(2)
    job_id = submit(pg_engine, storage, redis_url, account, txt2img("block:5"))
    wait_for_pid(redis_url, job_id)
    # A duplicate delivery while the attempt runs (on the other worker): its lease is live.
    Publisher(redis_url)("dispatch", {"job_id": job_id, "type": "txt2img"})
    done = wait_terminal(pg_engine, job_id, timeout_s=30)  # 5 s without progress > TTL 3 s
    assert (done.status, done.charged, done.attempt) == ("succeeded", 1, 1)
    assert outcomes(jobs.get(pg_engine, account, job_id)) == [(1, "succeeded")]
    assert len(results(pg_engine, job_id)) == 1
    assert run_transaction(pg_engine, verify) == []


def test_cancel_of_a_job_whose_worker_died_ends_it_within_the_ttl(
    workers: Workers, pg_engine: Engine, storage: Storage, redis_url: str, account: str
) -> None:
    workers.ensure(2)
    job_id = submit(pg_engine, storage, redis_url, account, txt2img("gate", num_images=3))
    child = wait_for_pid(redis_url, job_id)
    workers.kill_holder(child)
    canceled_at = time.monotonic()
    assert jobs.cancel(pg_engine, account, job_id)["status"] == "running"  # lease still live
    done = wait_terminal(pg_engine, job_id, timeout_s=RECOVERY_BOUND_S + 10)
    assert time.monotonic() - canceled_at <= TTL_S + SWEEP_S + 3.0
    assert (done.status, done.charged, done.refunded) == ("canceled", 0, 3)
    assert outcomes(jobs.get(pg_engine, account, job_id)) == [(1, "lease_expired")]
    hold = run_transaction(pg_engine, lambda c: ledger.get_hold(c, job_id))
    assert hold is not None and hold.status == "released"
    assert available(pg_engine, account) == 20
    assert run_transaction(pg_engine, verify) == []


def test_the_sweep_dispatches_a_render_as_its_family_task() -> None:
    from orchestrator.tunes.service import RENDER_TASK

    assert lease_sweep.RENDER_TYPE == RENDER_TASK
