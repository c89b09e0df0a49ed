"""Flower against the project's broker: a real worker (scripted runners) runs a real job;
Flower's HTTP API, behind basic auth, shows the worker online and the task succeeded under
a name that says what the job is (task name = family, uuid = job id) and without the job's
prompt. The same worker serves its Prometheus metrics (workers.metrics).

This module is also the worker's Celery app (`-A tests.test_flower`): the test worker app
plus workers.metrics, whether or not workers.app imports it already."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

import workers.metrics  # noqa: F401  (signals for the worker below)
from orchestrator.storage import Storage
from tests.ledger_helpers import grant, new_account
from tests.lifecycle_helpers import submit, wait_terminal
from tests.support.services import celery_worker

ROOT = Path(__file__).resolve().parents[1]
AUTH = ("ops", "flower-test-pass")
FLOWER_READY_S = 30
FLOWER_POLL_S = 30


def __getattr__(name: str) -> Any:
    """`app` for the worker process only (importing it needs TOLLGATE_REDIS_URL)."""
    if name == "app":
        from tests.support.worker_app import app

        return app
    raise AttributeError(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(fn: Any, timeout_s: float = FLOWER_POLL_S) -> Any:
    """fn() until it returns something truthy (its last error is reported on timeout)."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except (httpx.HTTPError, KeyError, AssertionError) as exc:
            last = exc
        time.sleep(0.25)
    raise TimeoutError(f"gave up waiting: {last!r}")


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def worker(
    service_env: dict[str, str],
    settings_env: None,
    metrics_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    env = {
        **service_env,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("prometheus")),
        "TOLLGATE_WORKER_METRICS_PORT": str(metrics_port),
    }
    with celery_worker(env, tmp_path_factory.mktemp("logs"), app="tests.test_flower") as proc:
        yield proc


@pytest.fixture(scope="module")
def flower(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("flower") / "flower.log"
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
        f"--basic-auth={AUTH[0]}:{AUTH[1]}",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, env=service_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + FLOWER_READY_S
        while True:
            assert proc.poll() is None, f"flower exited: {log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/healthcheck", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"flower not up: {log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def beat(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The real beat: it sends tollgate.republish every 5 s and tollgate.reap every 15 s."""
    folder = tmp_path_factory.mktemp("beat")
    log_path = folder / "beat.log"
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "beat",
        "-l",
        "info",
        "--schedule",
        str(folder / "schedule"),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, env=service_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
    try:
        yield log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_flower_shows_the_worker_and_the_job(
    flower: str,
    beat: Path,
    worker: Any,
    pg_engine: Engine,
    storage: Storage,
    redis_url: str,
    metrics_port: int,
) -> None:
    assert httpx.get(f"{flower}/api/workers", timeout=5).status_code == 401, "basic auth"
    assert httpx.get(f"{flower}/", auth=("ops", "wrong"), timeout=5).status_code == 401

    account = new_account(pg_engine)
    grant(pg_engine, account, 5)
    prompt = f"a lighthouse at dusk, secret-{secrets.token_hex(6)}"
    spec = {"type": "txt2img", "prompt": prompt, "width": 512, "height": 512, "steps": 20}
    job_id = submit(pg_engine, storage, redis_url, account, spec)
    assert wait_terminal(pg_engine, job_id).status == "succeeded"

    def online() -> dict[str, bool]:
        reply = httpx.get(
            f"{flower}/api/workers", params={"refresh": "1", "status": "1"}, auth=AUTH, timeout=10
        )
        reply.raise_for_status()
        return {name: up for name, up in reply.json().items() if name.startswith("test-") and up}

    assert poll(online), "the worker is online in Flower"

    def task() -> dict[str, Any] | None:
        reply = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=10)
        reply.raise_for_status()
        found = reply.json().get(job_id)
        return found if found and found.get("state") == "SUCCESS" else None

    listed = poll(task)
    assert listed["name"] == "tollgate.txt2img"
    assert listed["uuid"] == job_id
    assert job_id in listed["args"]
    assert listed["kwargs"] in ("{}", {}, None)
    detail = httpx.get(f"{flower}/api/task/info/{job_id}", auth=AUTH, timeout=10)
    detail.raise_for_status()
    for shown in (listed, detail.json()):
        text = json.dumps(shown)
        assert prompt not in text and "lighthouse" not in text, "Flower must not show prompts"
        assert "api_key" not in text.lower()

    metrics = poll(lambda: httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text)
    line = 'tollgate_worker_jobs_total{family="txt2img",outcome="succeeded",queue="gpu.txt2img"}'
    assert f"{line} 1.0" in metrics, metrics
    assert (
        'tollgate_worker_job_duration_seconds_count{family="txt2img",outcome="succeeded"} 1.0'
        in (metrics)
    )
    assert 'tollgate_worker_jobs_running{family="txt2img"} 0.0' in metrics
    # Queue wait (submit to first start) and end-to-end latency, per family.
    assert 'tollgate_worker_queue_wait_seconds_count{family="txt2img"} 1.0' in metrics
    assert (
        'tollgate_worker_job_latency_seconds_count{family="txt2img",outcome="succeeded"} 1.0'
        in metrics
    )

    # Housekeeping ran meanwhile (beat sent it, the worker ran it) but is not in Flower.
    assert poll(lambda: log_text(beat).count("Sending due task republish") >= 2, 40)
    housekeeping = ("tollgate.republish", "tollgate.reap", "tollgate.tunes")
    listed_tasks = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=10).json()
    names = {t.get("name") for t in listed_tasks.values()}
    assert not names & set(housekeeping), names
    assert job_id in listed_tasks  # the product task stays


def log_text(path: Path) -> str:
    return path.read_text(errors="replace")
