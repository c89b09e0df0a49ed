"""Start real service processes (Celery workers, the API, intake) for tests."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

WORKER_READY_TIMEOUT_S = 60
ALL_QUEUES = "gpu.txt2img,gpu.post,gpu.train,tollgate.callbacks,tollgate.maintenance"


@contextmanager
def celery_worker(
    env: dict[str, str],
    log_dir: Path,
    *,
    app: str = "tests.support.worker_app",
    queues: str = ALL_QUEUES,
    concurrency: int = 2,
) -> Iterator[subprocess.Popen[bytes]]:
    name = f"test-{secrets.token_hex(3)}@%h"
    log_path = log_dir / f"worker-{secrets.token_hex(3)}.log"
    with (
        open(log_path, "wb") as log,
        _running(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                app,
                "worker",
                "-Q",
                queues,
                "-c",
                str(concurrency),
                "-P",
                "prefork",
                "-n",
                name,
                "--without-mingle",
                "--without-gossip",
                "-l",
                "info",
            ],
            env,
            log,
        ) as proc,
    ):
        _wait_ready(log_path, proc)
        yield proc


@contextmanager
def kit_worker(
    env: dict[str, str],
    models_kit_dir: Path,
    log_dir: Path,
    queues: str,
    *,
    app: str = "workers.app",
) -> Iterator[subprocess.Popen[bytes]]:
    """The product's worker (real model code, `-c 1`) on the tiny model kit, on the CPU,
    offline: `env` plus TOLLGATE_MODELS, TOLLGATE_DEVICE=cpu and HF_HUB_OFFLINE=1."""
    kit_env = {
        **env,
        "TOLLGATE_MODELS": str(models_kit_dir / "models.toml"),
        "TOLLGATE_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    with celery_worker(kit_env, log_dir, app=app, queues=queues, concurrency=1) as proc:
        yield proc


@contextmanager
def celery_beat(
    env: dict[str, str], log_dir: Path, *, app: str = "tests.support.worker_app"
) -> Iterator[subprocess.Popen[bytes]]:
    """Celery beat with the product's schedule (its intervals from `env`)."""
    log_path = log_dir / f"beat-{secrets.token_hex(3)}.log"
    schedule = log_dir / f"beat-{secrets.token_hex(3)}.schedule"
    argv = [sys.executable, "-m", "celery", "-A", app, "beat", "-s", str(schedule), "-l", "info"]
    with open(log_path, "wb") as log, _running(argv, env, log) as proc:
        _wait_ready(log_path, proc, marker=b"beat: Starting")
        yield proc


@contextmanager
def _running(argv: list[str], env: dict[str, str], log: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, terminated (then killed) on exit."""
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).parents[2],
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(log_path: Path, proc: subprocess.Popen[bytes], marker: bytes = b"ready.") -> None:
    deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited: {log_path.read_text()[-3000:]}")
        if marker in log_path.read_bytes():
            return
        time.sleep(0.1)
    raise RuntimeError(f"worker not ready: {log_path.read_text()[-3000:]}")


def wait_for_pid(redis_url: str, job_id: str, timeout_s: float = 30) -> int:
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = client.get(f"tollgate:test:pid:{job_id}")
        if value:
            return int(value)
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} never started")


def kill(pid: int) -> None:
    os.kill(pid, 9)


def parent_pid(pid: int) -> int:
    """The parent of a process (a pool child's worker main process)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
