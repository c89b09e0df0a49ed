"""Ledger commands: quote, db upgrade, accounts, credits, ledger verify."""

from __future__ import annotations

import uuid
from datetime import datetime

import click

import billing
from billing import ledger as ledger_ops
from billing.db import run_transaction
from billing.verify import verify
from orchestrator import accounts as account_service
from orchestrator.cli.output import EXIT_BAD_INPUT, fail, parse_json_arg, print_json
from orchestrator.db import get_engine, upgrade


@click.command()
@click.argument("job_json")
def quote(job_json: str) -> None:
    """Price a job spec: prints {"credits", "credit_kind", "breakdown"}."""
    spec = parse_json_arg(job_json)
    try:
        print_json(billing.quote(spec).as_dict())
    except billing.InvalidJobSpec as exc:
        fail(str(exc), EXIT_BAD_INPUT)


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION."""
    upgrade(revision=revision)
    click.echo(f"database at {revision}")


@click.group()
def accounts() -> None:
    """Accounts."""


@accounts.command("create")
@click.argument("name")
@click.option("--plan", type=click.Choice(ledger_ops.PLANS), default="free", show_default=True)
@click.option("--json", "as_json", is_flag=True, help='Print {"id", "api_key"}.')
def accounts_create(name: str, plan: str, as_json: bool) -> None:
    """Create an account; prints its id and an API key (shown once)."""
    try:
        new = account_service.create_account(get_engine(), name, plan)
    except billing.BillingError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    if as_json:
        print_json({"id": new.id, "api_key": new.api_key})
    else:
        click.echo(f"account {new.id}\napi key {new.api_key}  (shown once; store it)")


@click.group()
def credits() -> None:
    """Credits."""


def _parse_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--expires-at: not an ISO 8601 time: {text!r}", EXIT_BAD_INPUT)
    if value.tzinfo is None:
        fail("--expires-at: give a time zone (e.g. 2027-01-01T00:00:00+00:00)", EXIT_BAD_INPUT)
    return value


@credits.command("grant")
@click.argument("account")
@click.option("--kind", type=click.Choice(billing.CREDIT_KINDS), required=True)
@click.option("--amount", type=int, required=True)
@click.option(
    "--source", type=click.Choice(ledger_ops.GRANT_SOURCES), default="adjustment", show_default=True
)
@click.option("--expires-at", default=None, help="ISO 8601 time with a zone.")
@click.option("--reference", default=None, help="Idempotency reference (default: a new one).")
def credits_grant(
    account: str, kind: str, amount: int, source: str, expires_at: str | None, reference: str | None
) -> None:
    """Grant credits to ACCOUNT (idempotent on --reference)."""
    expiry = _parse_time(expires_at)
    ref = reference or f"cli-{uuid.uuid4()}"
    try:
        result = run_transaction(
            get_engine(),
            lambda conn: ledger_ops.grant(
                conn, account, kind, amount, source=source, reference=ref, expires_at=expiry
            ),
        )
    except billing.BillingError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    if result.created and kind == "tune_image":
        from orchestrator.tunes.service import start_waiting_renders

        started = start_waiting_renders(get_engine(), account)
        if started:
            click.echo(
                f"renders started for waiting tunes: {', '.join(started)} "
                "(published by the beat re-publisher)"
            )
    verb = "granted" if result.created else "already granted"
    click.echo(f"{verb} {amount} {kind} credits to {account} (reference {ref})")


@credits.command("void")
@click.argument("reference")
@click.option("--amount", type=int, default=None, help="Credits to void (default: all left).")
@click.option("--json", "as_json", is_flag=True)
def credits_void(reference: str, amount: int | None, as_json: bool) -> None:
    """Void the grant REFERENCE (a refund): its free credits now, held ones when released;
    what was already spent or expired is reported as the shortfall."""
    from orchestrator.payments.purchases import void_grant

    try:
        done = run_transaction(get_engine(), lambda conn: void_grant(conn, reference, amount))
    except billing.BillingError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    if as_json:
        print_json(
            {
                "reference": done.reference,
                "account_id": done.account_id,
                "kind": done.kind,
                "requested": done.requested,
                "voided": done.voided,
                "shortfall": done.shortfall,
                "total_voided": done.total_voided,
                "total_shortfall": done.total_shortfall,
            }
        )
        return
    click.echo(
        f"voided {done.voided} of {done.requested} {done.kind} credits of grant {reference}"
        f" (shortfall {done.shortfall}; in all voided {done.total_voided},"
        f" shortfall {done.total_shortfall})"
    )


@credits.command("balance")
@click.argument("account")
@click.option("--json", "as_json", is_flag=True)
def credits_balance(account: str, as_json: bool) -> None:
    """Balance, held and available credits per kind."""
    try:
        rows = run_transaction(get_engine(), lambda conn: ledger_ops.get_balances(conn, account))
    except billing.BillingError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    if as_json:
        print_json(
            {b.kind: {"balance": b.balance, "held": b.held, "available": b.available} for b in rows}
        )
        return
    click.echo(f"{'kind':<12}{'balance':>10}{'held':>10}{'available':>11}")
    for b in rows:
        click.echo(f"{b.kind:<12}{b.balance:>10}{b.held:>10}{b.available:>11}")


@click.group("ledger")
def ledger_group() -> None:
    """Ledger checks."""


@ledger_group.command("verify")
def ledger_verify() -> None:
    """Check every ledger invariant; exits 1 naming each violation."""
    problems = run_transaction(get_engine(), verify)
    if problems:
        for problem in problems:
            click.echo(f"VIOLATION {problem}")
        fail(f"{len(problems)} ledger invariant violation(s)")
    click.echo("ledger ok")
