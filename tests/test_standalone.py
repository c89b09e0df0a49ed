"""The embedded default: `tollgate standalone` with no database or Redis configured runs a
SQLite file and an embedded Redis, serves a job end to end, and stops everything on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from billing import ledger
from billing.db import make_engine, run_transaction
from orchestrator import accounts
from orchestrator.standalone import free_port

READY_TIMEOUT_S = 120
JOB_TIMEOUT_S = 120


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def test_standalone_on_sqlite_and_embedded_redis(tmp_path: Path, models_kit_dir: Path) -> None:
    port = free_port()
    var = tmp_path / "var"
    env = {
        k: v
        for k, v in os.environ.items()
        # No secrets either: the embedded default makes its own (and every process accepts them).
        if k
        not in (
            "TOLLGATE_DATABASE_URL",
            "TOLLGATE_REDIS_URL",
            "TOLLGATE_STORAGE_URL",
            "TOLLGATE_CALLBACK_SECRET",
            "TOLLGATE_OUTPUT_URL_SECRET",
        )
    }
    env.update(
        {
            "TOLLGATE_MODELS": str(models_kit_dir / "models.toml"),
            "HF_HUB_OFFLINE": "1",
            "TOLLGATE_DEVICE": "cpu",
        }
    )
    log = tmp_path / "standalone.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "standalone",
                "--port",
                str(port),
                "--var-dir",
                str(var),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[1],
        )
    try:
        api = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "API at" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert (var / "tollgate.db").exists()  # the SQLite file, not a server
        children = _children(proc.pid)
        assert len(children) == 6  # redis, api, intake, worker, beat, flower
        assert "Flower at http://127.0.0.1:" in log.read_text() and "password" in log.read_text()
        engine = make_engine(f"sqlite:///{var / 'tollgate.db'}")
        new = accounts.create_account(engine, "standalone", "free")
        run_transaction(
            engine,
            lambda c: ledger.grant(c, new.id, "image", 5, source="promo", reference=f"s-{new.id}"),
        )
        auth = {"Authorization": f"Bearer {new.api_key}"}
        spec = {"type": "txt2img", "prompt": "a boat", "width": 256, "height": 256, "steps": 2}
        r = httpx.post(f"{api}/v1/jobs", json={"spec": spec}, headers=auth, timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        job = r.json()
        while job["status"] not in ("succeeded", "failed", "expired", "canceled"):
            assert time.monotonic() < deadline, (job, log.read_text()[-3000:])
            time.sleep(0.3)
            job = httpx.get(f"{api}/v1/jobs/{job_id}", headers=auth, timeout=30).json()
        assert (job["status"], job["charged"]) == ("succeeded", 1), job
        balance = httpx.get(f"{api}/v1/balance", headers=auth, timeout=30).json()
        assert balance["image"] == {"balance": 4, "held": 0, "available": 4}
        engine.dispose()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=60)
    for child in children:
        assert not Path(f"/proc/{child}").exists() or _zombie(child), f"{child} still running"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _start_standalone(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TOLLGATE_DATABASE_URL", "TOLLGATE_REDIS_URL", "TOLLGATE_STORAGE_URL")
    }
    log = tmp_path / "standalone.log"
    argv = [sys.executable, "-m", "orchestrator", "standalone", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*argv, "--var-dir", str(tmp_path / "var")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[1],
        )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while "API at" not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    found = re.search(r"Flower at (\S+)  user (\S+)  password (\S+)", log.read_text())
    assert found, log.read_text()[-3000:]
    flower, auth = found[1], (found[2], found[3])
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:  # Flower is up behind basic auth with the printed credentials
        try:
            assert httpx.get(f"{flower}/api/tasks", timeout=2).status_code == 401
            if httpx.get(f"{flower}/api/tasks", auth=auth, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    return proc, log


def _wait_gone(pids: list[int], log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(_gone(p) for p in pids):
        left = [p for p in pids if not _gone(p)]
        assert time.monotonic() < deadline, (left, log.read_text()[-3000:])
        time.sleep(0.2)


def test_sigterm_stops_standalone_like_ctrl_c(tmp_path: Path) -> None:
    proc, log = _start_standalone(tmp_path)
    tree = _descendants(proc.pid)
    assert len(tree) >= 6
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert "stopping" in log.read_text()
    _wait_gone(tree, log)
    assert (tmp_path / "var" / "logs" / "standalone.log").stat().st_size > 0


def test_sigkill_of_standalone_leaves_no_orphans(tmp_path: Path) -> None:
    proc, log = _start_standalone(tmp_path)
    tree = _descendants(proc.pid)
    assert len(tree) >= 6
    proc.kill()
    proc.wait(timeout=10)
    _wait_gone(tree, log)  # PR_SET_PDEATHSIG: the kernel stopped every child
