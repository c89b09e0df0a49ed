"""Outside the embedded demo the API, the intake and a worker refuse to start with the
default (or an empty) callback secret, naming TOLLGATE_CALLBACK_SECRET (the API also the
default output-URL secret); the API says at
startup when admin routes are disabled."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.standalone import free_port

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60


def _env(service_env: dict[str, str], **values: str) -> dict[str, str]:
    env = {k: v for k, v in service_env.items() if k != "TOLLGATE_CALLBACK_SECRET"}
    env.pop("TOLLGATE_EMBEDDED_DEMO", None)
    env.update(values)
    return env


COMMANDS = {
    "api": [sys.executable, "-m", "orchestrator", "api", "--port", "0"],
    "intake": [sys.executable, "-m", "orchestrator", "intake"],
    "worker": [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        "-Q",
        "tollgate.maintenance",
        "-P",
        "solo",
        "--without-mingle",
        "--without-gossip",
    ],
}


@pytest.mark.parametrize("component", sorted(COMMANDS))
@pytest.mark.parametrize("secret", [None, "change-me", ""])
def test_refuses_the_default_callback_secret(
    component: str, secret: str | None, service_env: dict[str, str]
) -> None:
    extra = {} if secret is None else {"TOLLGATE_CALLBACK_SECRET": secret}
    out = subprocess.run(
        COMMANDS[component],
        env=_env(service_env, **extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    assert out.returncode != 0
    assert "TOLLGATE_CALLBACK_SECRET" in out.stdout + out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("secret", [None, "change-me", ""])
def test_the_api_refuses_the_default_output_url_secret(
    secret: str | None, service_env: dict[str, str]
) -> None:
    env = _env(service_env, TOLLGATE_CALLBACK_SECRET=service_env["TOLLGATE_CALLBACK_SECRET"])
    env.pop("TOLLGATE_OUTPUT_URL_SECRET", None)
    if secret is not None:
        env["TOLLGATE_OUTPUT_URL_SECRET"] = secret
    out = subprocess.run(
        COMMANDS["api"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    assert out.returncode != 0
    assert "TOLLGATE_OUTPUT_URL_SECRET" in out.stdout + out.stderr, out.stderr[-2000:]


def test_the_api_says_when_admin_routes_are_disabled(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "api.log"
    env = _env(
        service_env,
        TOLLGATE_CALLBACK_SECRET=service_env["TOLLGATE_CALLBACK_SECRET"],
        TOLLGATE_ADMIN_TOKEN="",
    )
    argv = [sys.executable, "-m", "orchestrator", "api", "--port", str(free_port())]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Uvicorn running" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert "admin routes" in log.read_text() and "TOLLGATE_ADMIN_TOKEN" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
