"""`tollgate`: the command line. Exit codes: 0 ok, 1 operational failure, 2 bad input."""

from __future__ import annotations

import click

from models.cli import models as models_group
from orchestrator.cli.api import api
from orchestrator.cli.jobs import intake, jobs, submit
from orchestrator.cli.ledger import accounts, credits, db, ledger_group, quote
from orchestrator.cli.processes import demo, standalone
from orchestrator.cli.queue import queue
from orchestrator.cli.webhooks import webhooks


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Tollgate: credit-gated GPU job orchestrator for image AI."""


# The model commands import torch lazily, inside each command: API installs can list them.
main.add_command(models_group)
for command in (
    quote,
    db,
    accounts,
    credits,
    ledger_group,
    standalone,
    demo,
    submit,
    jobs,
    intake,
    api,
    queue,
    webhooks,
):
    main.add_command(command)
