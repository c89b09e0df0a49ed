"""Job commands: submit (via the Redis queue or in-process), jobs show/list/cancel, intake.

`submit --wait` exit codes: 0 succeeded; 1 failed, canceled, expired (or no end in time);
2 rejected or dead-lettered (and bad input, as everywhere in the CLI).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import click

import billing
from orchestrator.cli.output import EXIT_BAD_INPUT, EXIT_FAILURE, fail, parse_json_arg, print_json
from orchestrator.jobs import service as job_service
from orchestrator.jobs import states
from orchestrator.jobs.images import InvalidImage, UnknownImage
from orchestrator.tunes import service as _tunes  # noqa: F401  (registers the tune family)

EXIT_OK: Final = 0
POLL_INTERVAL_S: Final = 0.5
DEFAULT_WAIT_S: Final = 3600.0
BAR_WIDTH: Final = 30

SUBMIT_REFUSALS = (
    billing.InvalidJobSpec,
    billing.UnknownAccount,
    job_service.IdempotencyConflict,
    job_service.JobRejected,
    InvalidImage,
    UnknownImage,
)


def exit_code_for(status: str) -> int:
    if status == states.SUCCEEDED:
        return EXIT_OK
    if status == states.REJECTED:
        return EXIT_BAD_INPUT
    return EXIT_FAILURE


class ProgressLine:
    """Status changes as lines, progress as a bar on stderr (redrawn in place on a tty)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last: tuple[int, int] | None = None

    def status(self, job_id: str, status: str) -> None:
        self.end_bar()
        click.echo(f"{job_id}: {status}", err=True)

    def progress(self, step: int, total: int) -> None:
        if total <= 0 or (step, total) == self._last:
            return
        self._last = (step, total)
        filled = BAR_WIDTH * min(step, total) // total
        bar = f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {step}/{total}"
        if self.tty:
            click.echo(f"\r{bar}", err=True, nl=False)
        else:
            click.echo(bar, err=True)

    def end_bar(self) -> None:
        if self.tty and self._last is not None:
            click.echo("", err=True)
            self._last = None


def _redis_url() -> str:
    from orchestrator.settings import get_settings

    return get_settings().redis_url


@click.command()
@click.argument("job_json")
@click.option("--account", "account_id", required=True, help="The paying account's id.")
@click.option("--wait", "wait_", is_flag=True, help="Follow the job to its end.")
@click.option("--idempotency-key", default=None, help="Default: a new one (printed).")
@click.option("--callback-url", default=None, help="Receives the job's events (Standard Webhooks).")
@click.option(
    "--webhook-events",
    "webhook_events",
    default=None,
    help="Comma-separated events for --callback-url: start, progress, completed "
    "(default: completed).",
)
@click.option(
    "--via",
    type=click.Choice(["redis", "direct"]),
    default=None,
    help="redis: through the intake queue (default when TOLLGATE_REDIS_URL is set); "
    "direct: in this process.",
)
@click.option("--timeout", "timeout_s", type=float, default=DEFAULT_WAIT_S, show_default=True)
def submit(
    job_json: str,
    account_id: str,
    wait_: bool,
    idempotency_key: str | None,
    callback_url: str | None,
    webhook_events: str | None,
    via: str | None,
    timeout_s: float,
) -> None:
    """Submit JOB_JSON (a job spec) for ACCOUNT."""
    from billing import InvalidJobSpec
    from orchestrator.jobs.webhooks import validate_events_filter

    spec = parse_json_arg(job_json)
    try:
        events = validate_events_filter(
            None if webhook_events is None else [e.strip() for e in webhook_events.split(",")]
        )
    except InvalidJobSpec as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    hook = (callback_url, events)
    via = via or ("redis" if _redis_url() else "direct")
    if via == "redis":
        _submit_via_redis(account_id, spec, idempotency_key, hook, wait_, timeout_s)
    else:
        _submit_direct(account_id, spec, idempotency_key, hook, wait_, timeout_s)


def _submit_via_redis(
    account_id: str,
    spec: Any,
    idempotency_key: str | None,
    hook: tuple[str | None, list[str] | None],
    wait_: bool,
    timeout_s: float,
) -> None:
    from orchestrator.client import DeadLettered, TollgateClient, WaitTimeout

    url = _redis_url()
    if not url:
        fail("--via redis needs TOLLGATE_REDIS_URL", EXIT_BAD_INPUT)
    if not isinstance(spec, dict):
        fail("job json must be a JSON object", EXIT_BAD_INPUT)
    try:  # what pricing refuses (an unknown field too) fails here, not in the dead letter
        billing.quote(spec)
    except billing.InvalidJobSpec as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    client = TollgateClient(url)
    sub = client.submit(account_id, spec, idempotency_key, *hook)
    if not wait_:
        print_json({"message_id": sub.message_id, "idempotency_key": sub.idempotency_key})
        return
    click.echo(f"queued as message {sub.message_id} (key {sub.idempotency_key})", err=True)
    line = ProgressLine()
    try:
        outcome = client.wait(sub, timeout_s, line.progress, on_status=line.status)
    except DeadLettered as exc:
        line.end_bar()
        fail(exc.reason, EXIT_BAD_INPUT)
    except WaitTimeout as exc:
        fail(str(exc), EXIT_FAILURE)
    print_json({"job_id": outcome.job_id, **outcome.event, "status": outcome.status})
    sys.exit(exit_code_for(outcome.status))


def _submit_direct(
    account_id: str,
    spec: Any,
    idempotency_key: str | None,
    hook: tuple[str | None, list[str] | None],
    wait_: bool,
    timeout_s: float,
) -> None:
    from orchestrator.db import get_engine
    from orchestrator.storage import get_storage

    engine = get_engine()
    try:
        submitted = job_service.submit(
            engine,
            get_storage(),
            account_id,
            spec,
            idempotency_key=idempotency_key,
            callback_url=hook[0],
            webhook_events_filter=hook[1],
            source="cli",
        )
    except job_service.JobRejected as exc:
        fail(f"job {exc.job_id} rejected: {exc.cause}", EXIT_BAD_INPUT)
    except SUBMIT_REFUSALS as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    _relay(engine, submitted.job["id"])
    if not wait_:
        print_json(submitted.job)
        return
    job = _poll_until_done(engine, submitted.job["id"], timeout_s, ProgressLine())
    print_json(job)
    sys.exit(exit_code_for(job["status"]))


def _relay(engine: Any, job_id: str) -> None:
    """Dispatch what the slots allow and publish the job's event now (needs Redis;
    otherwise the periodic dispatcher and the re-publisher will)."""
    if not _redis_url():
        return
    from orchestrator.scheduling.dispatch import get_publisher
    from orchestrator.scheduling.scheduler import nudge

    nudge(engine, get_publisher(), job_id)


def _poll_until_done(
    engine: Any, job_id: str, timeout_s: float, line: ProgressLine
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last_status = ""
    while True:
        job = job_service.get(engine, None, job_id)
        if job["status"] != last_status:
            last_status = job["status"]
            line.status(job_id, last_status)
        line.progress(job["progress"]["step"], job["progress"]["total"])
        if states.is_terminal(job["status"]):
            return job
        if time.monotonic() > deadline:
            fail(f"no end for {job_id} within {timeout_s:g} s", EXIT_FAILURE)
        time.sleep(POLL_INTERVAL_S)


@click.group()
def jobs() -> None:
    """Jobs (any account's: an operator's view)."""


def _service_call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except job_service.JobNotFound as exc:
        fail(f"no job {exc}", EXIT_BAD_INPUT)
    except job_service.CannotCancel as exc:
        fail(str(exc), EXIT_FAILURE)
    except billing.InvalidJobSpec as exc:
        fail(str(exc), EXIT_BAD_INPUT)


def _engine() -> Any:
    from orchestrator.db import get_engine

    return get_engine()


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def jobs_show(job_id: str, as_json: bool) -> None:
    """One job."""
    job = _service_call(lambda: job_service.get(_engine(), None, job_id))
    if as_json:
        print_json(job)
        return
    for key in ("id", "account_id", "type", "status", "error", "created_at", "finished_at"):
        click.echo(f"{key:<12}{job[key] if job[key] is not None else '-'}")
    price = job["price"]
    click.echo(f"{'price':<12}{price['credits']} {price['credit_kind']}")
    click.echo(f"{'charged':<12}{job['charged']} (refunded {job['refunded']})")
    click.echo(f"{'progress':<12}{job['progress']['step']}/{job['progress']['total']}")
    click.echo(f"{'outputs':<12}{len(job['outputs'])}")
    if job.get("attempts"):
        click.echo("attempts")
        click.echo(f"  {'#':<3}{'phase':<10}{'worker':<28}{'started':<34}{'ended':<34}outcome")
        for a in job["attempts"]:
            click.echo(
                f"  {a['number']:<3}{a['phase']:<10}{(a['worker'] or '-'):<28}"
                f"{a['started_at']:<34}{(a['ended_at'] or '-'):<34}{a['outcome'] or 'running'}"
            )


@jobs.command("list")
@click.option("--account", "account_id", default=None)
@click.option("--status", type=click.Choice(states.STATUSES), default=None)
@click.option(
    "--limit",
    type=click.IntRange(1, job_service.LIST_LIMIT_MAX),
    default=20,
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True)
def jobs_list(account_id: str | None, status: str | None, limit: int, as_json: bool) -> None:
    """Newest jobs first."""
    rows = _service_call(
        lambda: job_service.list_jobs(_engine(), account_id, status=status, limit=limit)
    )
    if as_json:
        print_json(rows)
        return
    click.echo(f"{'id':<30}{'account':<30}{'type':<18}{'status':<12}{'price':>6}  created")
    for job in rows:
        click.echo(
            f"{job['id']:<30}{job['account_id']:<30}{job['type']:<18}{job['status']:<12}"
            f"{job['price']['credits']:>6}  {job['created_at']}"
        )


@jobs.command("cancel")
@click.argument("job_id")
def jobs_cancel(job_id: str) -> None:
    """Cancel a job: queued/dispatched are refunded now, running stops at its next step."""
    engine = _engine()
    job = _service_call(lambda: job_service.cancel(engine, None, job_id))
    _relay(engine, job_id)
    click.echo(f"{job_id}: {job['status']} (refunded {job['refunded']})")


@click.command()
@click.option("--name", default=None, help="Consumer name (default: hostname-pid).")
@click.option("--batch-size", type=click.IntRange(1, 100), default=16, show_default=True)
@click.option("--block-ms", type=click.IntRange(1, 10_000), default=2_000, show_default=True)
@click.option(
    "--claim-min-idle-ms",
    type=click.IntRange(0, 3_600_000),
    default=30_000,
    show_default=True,
    help="Take over another consumer's message after it sat unacknowledged this long.",
)
@click.option("--max-deliveries", type=click.IntRange(1, 100), default=5, show_default=True)
def intake(
    name: str | None, batch_size: int, block_ms: int, claim_min_idle_ms: int, max_deliveries: int
) -> None:
    """Run a consumer of the tollgate:jobs stream until SIGTERM/SIGINT."""
    from orchestrator.ingress.intake import consumer_from_settings, install_signal_handlers
    from orchestrator.ingress.streams import IntakeConfig
    from orchestrator.settings import UnsafeSettings, check_startup

    try:
        check_startup("intake")
    except UnsafeSettings as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = IntakeConfig(
        batch_size=batch_size,
        block_ms=block_ms,
        claim_min_idle_ms=claim_min_idle_ms,
        max_deliveries=max_deliveries,
    )
    try:
        consumer = consumer_from_settings(name, config)
    except RuntimeError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    install_signal_handlers(consumer)
    click.echo(f"intake {consumer.name} started", err=True)
    stats = consumer.run()
    click.echo(
        f"intake {consumer.name} stopped: {stats.accepted} accepted, {stats.dead} dead-lettered",
        err=True,
    )
