"""`tollgate webhooks secret`: a new Standard Webhooks signing secret for
TOLLGATE_CALLBACK_SECRET (`whsec_` + base64 of 32 random bytes)."""

from __future__ import annotations

import click

from orchestrator.settings import new_webhook_secret


@click.group()
def webhooks() -> None:
    """Job webhooks (Standard Webhooks)."""


@webhooks.command()
def secret() -> None:
    """Print a new whsec_ signing secret."""
    click.echo(new_webhook_secret())
