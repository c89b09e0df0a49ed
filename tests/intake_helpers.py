"""Helpers for intake tests: private stream names per test, a stepped consumer, and a CLI
entry point with the job commands (`python -m tests.intake_helpers ...`) for as long as
`orchestrator.cli.main` does not register them."""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import redis
from sqlalchemy import Engine, func, select

from billing.db import run_transaction
from orchestrator.ingress.intake import Consumer
from orchestrator.ingress.streams import IntakeConfig
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.storage import Storage
from orchestrator.tables import jobs

REPO_ROOT = Path(__file__).resolve().parents[1]
TXT2IMG = {"type": "txt2img", "prompt": "a lighthouse at dusk", "steps": 20}  # 1 image credit


def private_config(**overrides: Any) -> IntakeConfig:
    """Streams and group of this test only, short blocks, quick back-off."""
    tag = secrets.token_hex(4)
    values: dict[str, Any] = {
        "stream": f"test:{tag}:jobs",
        "dead_stream": f"test:{tag}:jobs:dead",
        "group": f"test-{tag}",
        "block_ms": 50,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        **overrides,
    }
    return IntakeConfig(**values)


def make_consumer(
    engine: Engine, storage: Storage, redis_url: str, config: IntakeConfig, name: str = "c1"
) -> Consumer:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    return Consumer(engine, storage, client, Publisher(redis_url), name=name, config=config)


def drain(consumer: Consumer, rounds_max: int = 50) -> int:
    """Step until a round finds nothing to do; returns how many messages were handled."""
    total = 0
    for _ in range(rounds_max):
        own_pending_round = consumer._recheck_own
        handled = consumer.step()
        total += handled
        if handled == 0 and not own_pending_round and not consumer._recheck_own:
            return total
    raise AssertionError(f"consumer still busy after {rounds_max} rounds")


def job_text(account_id: str, spec: Any = None, key: str | None = None, **extra: Any) -> str:
    body: dict[str, Any] = {"account_id": account_id, "spec": spec or TXT2IMG, **extra}
    if key is not None:
        body["idempotency_key"] = key
    return json.dumps(body)


def xadd(client: redis.Redis, config: IntakeConfig, text: str) -> str:
    return str(client.xadd(config.stream, {"job": text}))


def last_id(client: redis.Redis, stream: str) -> str:
    last: Any = client.xrevrange(stream, count=1)
    return str(last[0][0]) if last else "0-0"


def dead_letters(client: redis.Redis, config: IntakeConfig) -> list[dict[str, str]]:
    entries: Any = client.xrange(config.dead_stream)
    return [fields for _id, fields in entries]


def pending_count(client: redis.Redis, config: IntakeConfig) -> int:
    info: Any = client.xpending(config.stream, config.group)
    return int(info["pending"])


def jobs_of(engine: Engine, account_id: str) -> list[Any]:
    return run_transaction(
        engine,
        lambda c: list(
            c.execute(
                select(jobs).where(jobs.c.account_id == account_id).order_by(jobs.c.created_at)
            ).all()
        ),
    )


def job_count(engine: Engine, account_id: str) -> int:
    return run_transaction(
        engine,
        lambda c: c.execute(
            select(func.count()).select_from(jobs).where(jobs.c.account_id == account_id)
        ).scalar_one(),
    )


def wait_for(condition: Callable[[], Any], timeout_s: float = 15, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def cli_command() -> list[str]:
    """`python -m orchestrator` once the lead registers the job commands; this module until."""
    from orchestrator.cli import main

    if {"submit", "jobs", "intake"} <= set(main.commands):
        return [sys.executable, "-m", "orchestrator"]
    return [sys.executable, "-m", "tests.intake_helpers"]


def job_cli() -> click.Group:
    """A group with the job commands, for tests (in-process with CliRunner, or `-m`)."""
    from orchestrator.cli.jobs import intake, submit
    from orchestrator.cli.jobs import jobs as jobs_group

    group = click.Group("tollgate")
    for command in (submit, jobs_group, intake):
        group.add_command(command)
    return group


if __name__ == "__main__":
    job_cli()()
