"""The system under the soak: its own Redis, four accounts, and the Tollgate processes
(API, intake, two GPU-queue workers, a maintenance worker, beat), each a `Proc`."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.soak.processes import Proc, wait_log
from billing import ledger
from billing.db import run_transaction
from orchestrator import accounts
from orchestrator.standalone import redis_server_binary

PY = sys.executable
GPU_QUEUES = "gpu.txt2img,gpu.post"
# Beat's tasks (reaper, lease sweep, re-publisher) get a worker of their own, as in a
# deployment: behind a GPU worker's render they would expire before they ran.
MAINTENANCE_QUEUES = "tollgate.maintenance,tollgate.callbacks"
ACCOUNTS = 4  # the last one is short of credits
RICH_CREDITS = 100_000
POOR_CREDITS = 3


def redis_server(work: Path, port: int, env: dict[str, str]) -> Proc:
    """redis-server on `port` with an AOF fsynced on every write, in `work`/redis."""
    (work / "redis").mkdir()
    argv = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--save", "",
        "--dir", str(work / "redis"),
    ]  # fmt: skip
    return Proc("redis", argv, work / "redis.log", env)


@dataclass
class Accounts:
    owners: list[str]  # the accounts with plenty of credits
    poor: str
    keys: dict[str, str]  # account id -> API key
    granted: dict[str, int]  # account id -> image credits granted


def make_accounts(engine: Any) -> Accounts:
    owners: list[str] = []
    keys: dict[str, str] = {}
    granted: dict[str, int] = {}
    for i in range(ACCOUNTS):
        made = accounts.create_account(engine, f"chaos-{i}", "business")
        amount = POOR_CREDITS if i == ACCOUNTS - 1 else RICH_CREDITS

        def give(c: Any, a: str = made.id, amount: int = amount) -> Any:
            return ledger.grant(c, a, "image", amount, source="adjustment", reference=f"chaos-{a}")

        run_transaction(engine, give)
        keys[made.id], granted[made.id] = made.api_key, amount
        owners.append(made.id)
    poor = owners.pop()
    return Accounts(owners, poor, keys, granted)


@dataclass
class Stack:
    api: Proc
    api_port: int
    intake: Proc
    workers: list[Proc]
    maintenance: Proc
    beat: Proc

    @property
    def procs(self) -> list[Proc]:
        return [self.api, self.intake, *self.workers, self.maintenance, self.beat]

    def start(self) -> None:
        for p in self.procs:
            p.start()

    def wait_ready(self) -> None:
        wait_log(self.api.log, b"Uvicorn running")
        for w in self.workers:
            wait_log(w.log, b"ready.")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def tollgate(work: Path, env: dict[str, str], api_port: int) -> Stack:
    def celery(name: str, queues: str = GPU_QUEUES) -> Proc:
        argv = [PY, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues, "-c", "1",
                "-P", "prefork", "-n", f"{name}@%h", "--without-mingle", "--without-gossip",
                "-l", "info"]  # fmt: skip
        return Proc(name, argv, work / f"{name}.log", env)

    intake = Proc(
        "intake",
        [PY, "-m", "orchestrator", "intake", "--claim-min-idle-ms", "10000"],
        work / "intake.log",
        env,
    )
    api = Proc(
        "api",
        [PY, "-m", "orchestrator", "api", "--port", str(api_port)],
        work / "api.log",
        env,
    )
    beat = Proc(
        "beat",
        [PY, "-m", "celery", "-A", "workers.app", "beat", "-l", "info",
         "--schedule", str(work / "celerybeat-schedule")],
        work / "beat.log",
        env,
    )  # fmt: skip
    workers = [celery("chaos1"), celery("chaos2")]
    return Stack(api, api_port, intake, workers, celery("chaos-maint", MAINTENANCE_QUEUES), beat)
