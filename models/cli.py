"""``tollgate models ...`` commands (a click group the main CLI mounts)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click


@click.group(name="models")
def models() -> None:
    """Model registry and tiny model kit."""


@models.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=None, type=int, help="Seed for the random weights.")
@click.option("--no-sdxl", is_flag=True, help="Skip the tiny SDXL folder.")
@click.option("--no-gfpgan", is_flag=True, help="Skip GFPGAN + facexlib weights (~550 MB).")
@click.option("--force", is_flag=True, help="Rebuild even if the kit is already there.")
def make_tiny_cmd(
    directory: Path, seed: int | None, no_sdxl: bool, no_gfpgan: bool, force: bool
) -> None:
    """Build the tiny model kit in DIRECTORY and write DIRECTORY/models.toml."""
    from models.tiny import DEFAULT_SEED, make_tiny

    t0 = time.perf_counter()
    toml = make_tiny(
        directory,
        seed=DEFAULT_SEED if seed is None else seed,
        sdxl=not no_sdxl,
        gfpgan=not no_gfpgan,
        force=force,
    )
    click.echo(f"{toml} ({time.perf_counter() - t0:.1f} s)")
    click.echo(f"export TOLLGATE_MODELS={toml}")


@models.command("check")
@click.option(
    "--registry",
    "registry_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Registry file (default: $TOLLGATE_MODELS).",
)
def check_cmd(registry_path: Path | None) -> None:
    """Validate the registry and list missing model files (exit 1 if any)."""
    from models.errors import ModelError
    from models.registry import load_registry

    try:
        reg = load_registry(registry_path, check_files=False)
    except ModelError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    missing = reg.missing_files()
    for entry in reg:
        state = "missing" if entry.missing_files() else "ok"
        click.echo(f"{entry.id:24} {entry.family:7} {state:8} {entry.path}")
    for m in missing:
        click.echo(f"missing: {m}", err=True)
    sys.exit(1 if missing else 0)


if __name__ == "__main__":  # pragma: no cover
    models()
