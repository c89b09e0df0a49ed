"""`tollgate queue`: per queue, live slots, running and queued jobs and the top accounts by
queued jobs (what GET /v1/queue answers), read from the database and Redis directly."""

from __future__ import annotations

from typing import Any

import click

from orchestrator.cli.output import fail, print_json


def format_overview(data: dict[str, Any]) -> str:
    lines = [f"{'queue':<14} {'slots':>5} {'running':>7} {'queued':>7}  top accounts (queued)"]
    for name, q in data["queues"].items():
        top = ", ".join(
            f"{a['account_id']} [{a['plan']}] {a['queued']}" for a in q["top_accounts"][:5]
        )
        lines.append(
            f"{name:<14} {q['live_slots']:>5} {q['running']:>7} {q['queued']:>7}  {top or '-'}"
        )
    return "\n".join(lines)


@click.command("queue")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON of GET /v1/queue.")
def queue(as_json: bool) -> None:
    """Queues: live worker slots, running, queued, top accounts by queued jobs."""
    from orchestrator.db import get_engine
    from orchestrator.scheduling.dispatch import redis_for
    from orchestrator.scheduling.queues import overview
    from orchestrator.settings import get_settings

    redis_url = get_settings().redis_url
    if not redis_url:
        fail("TOLLGATE_REDIS_URL is not set: worker slots live in Redis")
    data = overview(get_engine(), redis_for(redis_url))
    if as_json:
        print_json(data)
    else:
        click.echo(format_overview(data))
