"""`tollgate api`: serve the HTTP API with uvicorn."""

from __future__ import annotations

from typing import Any

import click

WORKERS_MAX = 64


def worker_app() -> Any:
    """The app of one API process (uvicorn's factory with `--workers` > 1: each worker
    process builds its own app, engine pool, key cache and nudger thread)."""
    from orchestrator.api.app import create_app
    from orchestrator.faults import set_process

    set_process("api")
    return create_app()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, WORKERS_MAX),
    help="API processes sharing the port (uvicorn workers). Each has its own database pool,"
    " key cache and nudger; /metrics answers for the process that took the request.",
)
def api(host: str, port: int, workers: int) -> None:
    """Serve the HTTP API (docs at /docs). Settings come from TOLLGATE_* variables."""
    import uvicorn

    from orchestrator.faults import set_process

    set_process("api")
    from orchestrator.settings import UnsafeSettings, check_startup

    try:
        for warning in check_startup("api"):
            click.echo(f"warning: {warning}", err=True)
    except UnsafeSettings as exc:
        raise click.ClickException(str(exc)) from None
    if workers == 1:
        uvicorn.run(worker_app(), host=host, port=port, log_level="info")
    else:
        uvicorn.run(
            "orchestrator.cli.api:worker_app",
            factory=True,
            workers=workers,
            host=host,
            port=port,
            log_level="info",
        )
