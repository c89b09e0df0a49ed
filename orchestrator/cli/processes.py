"""Process commands: standalone and demo."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from orchestrator.cli.output import fail
from orchestrator.standalone import Standalone, Stop, stop_on_sigterm


@click.command()
@click.option("--port", default=8000, show_default=True, help="API port.")
@click.option("--var-dir", default="var", show_default=True, type=click.Path(path_type=Path))
@click.option("--concurrency", default=1, show_default=True, help="Worker processes.")
def standalone(port: int, var_dir: Path, concurrency: int) -> None:
    """Run API, intake, a worker, beat, Flower (and an embedded Redis if none is
    configured). Ctrl-C or SIGTERM stops everything."""
    stack = Standalone(api_port=port, var_dir=var_dir, worker_concurrency=concurrency)
    stop_on_sigterm()
    try:
        stack.start()
        click.echo(f"tollgate standalone: {stack.banner()}\nCtrl-C stops everything")
        stack.wait_forever()
    except (KeyboardInterrupt, Stop):
        click.echo("stopping ...")
    except RuntimeError as exc:
        fail(str(exc))
    finally:
        stack.stop()


@click.command()
@click.option("--port", default=8000, show_default=True, help="API port.")
@click.option("--var-dir", default="var", show_default=True, type=click.Path(path_type=Path))
@click.option("--exit", "exit_after", is_flag=True, help="Stop after the table (no waiting).")
def demo(port: int, var_dir: Path, exit_after: bool) -> None:
    """Submit a handful of jobs of every type on the embedded default and show the result."""
    from orchestrator.demo import run_demo

    sys.exit(run_demo(port, var_dir, wait=not exit_after))
