"""`tollgate api`: serve the HTTP API with uvicorn."""

from __future__ import annotations

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
def api(host: str, port: int) -> None:
    """Serve the HTTP API (docs at /docs). Settings come from TOLLGATE_* variables."""
    import uvicorn

    from orchestrator.api.app import create_app
    from orchestrator.faults import set_process

    set_process("api")
    from orchestrator.settings import UnsafeSettings, check_startup

    try:
        for warning in check_startup("api"):
            click.echo(f"warning: {warning}", err=True)
    except UnsafeSettings as exc:
        raise click.ClickException(str(exc)) from None
    uvicorn.run(create_app(), host=host, port=port, log_level="info")
