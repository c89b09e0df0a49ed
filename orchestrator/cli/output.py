"""Small helpers the CLI commands share."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=None, sort_keys=False, default=str))


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def parse_json_arg(text: str, what: str = "job json") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{what} is not valid JSON: {exc}", EXIT_BAD_INPUT)
