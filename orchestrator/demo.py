"""`tollgate demo` (`make demo`): the main job on the embedded default, start to finish.

Starts everything (`Standalone`), creates an account with credits, submits a handful of jobs
of every type through the Redis queue, shows live progress, prints a table of what each job
cost and where its output is, then leaves the API running until Ctrl-C.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Final

import click
import redis
from PIL import Image

from billing import ledger
from billing.db import run_transaction
from orchestrator import accounts
from orchestrator.db import get_engine
from orchestrator.jobs import service as jobs
from orchestrator.jobs.states import TERMINAL
from orchestrator.settings import get_settings
from orchestrator.standalone import Standalone, Stop, stop_on_sigterm
from orchestrator.storage import get_storage

DEMO_TIMEOUT_S: Final = 600
DEMO_CREDITS: Final = 100


def demo_photo() -> bytes:
    """A real photo with a face (scikit-image ships it) when available, else a gradient."""
    try:
        from skimage import data

        img = Image.fromarray(data.astronaut()).resize((256, 256))
    except ImportError:
        img = Image.linear_gradient("L").convert("RGB").resize((256, 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def demo_crops() -> list[str]:
    """Four crops of the demo photo: a tune's training set."""
    photo = Image.open(io.BytesIO(demo_photo()))
    out = []
    for left, top in ((0, 0), (24, 0), (0, 24), (24, 24)):
        buf = io.BytesIO()
        photo.crop((left, top, left + 232, top + 232)).resize((128, 128)).save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def demo_specs(photo_b64: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "txt2img",
            "prompt": "a lighthouse at dawn, oil painting",
            "width": 512,
            "height": 512,
            "steps": 20,
            "num_images": 4,
            "seed": 42,
        },
        {
            "type": "txt2img",
            "prompt": "a red fox in the snow",
            "width": 512,
            "height": 768,
            "steps": 60,
            "num_images": 2,
            "seed": 7,
        },
        {"type": "upscale", "scale": 2, "image_b64": photo_b64},
        {"type": "upscale", "scale": 4, "image_b64": photo_b64},
        {"type": "face_enhance", "image_b64": photo_b64},
        {"type": "remove_background", "image_b64": photo_b64},
        {
            "type": "tune",
            "name": "astronaut",
            "subject": "woman",
            "images_b64": demo_crops(),
            "training": {"steps": 30, "learning_rate": 1e-3},
        },
    ]


def build_tiny_models(var_dir: Path) -> str | None:
    """The tiny model kit, when the worker extra is installed."""
    try:
        from models.tiny import make_tiny
    except ImportError:
        click.echo("model layer not installed (pip install -e '.[worker]'): jobs will fail")
        return None
    return str(make_tiny(var_dir / "models"))


def run_demo(api_port: int, var_dir: Path, wait: bool) -> int:
    registry = build_tiny_models(var_dir)
    if registry and not os.environ.get("TOLLGATE_MODELS"):
        os.environ["TOLLGATE_MODELS"] = registry
    # Tiny CPU models: train and render the demo tune small (production: 512 px).
    os.environ.setdefault("TOLLGATE_TUNE_TRAIN_SIZE_PX", "128")
    os.environ.setdefault("TOLLGATE_TUNE_RENDER_SIZE_PX", "128")
    os.environ.setdefault("TOLLGATE_TUNE_RENDER_STEPS_MAX", "4")
    stack = Standalone(api_port=api_port, var_dir=var_dir, quiet=("redis", "beat", "flower"))
    stop_on_sigterm()
    try:
        stack.start()
        engine = get_engine()
        new = accounts.create_account(engine, f"demo-{secrets.token_hex(3)}", "free")
        for kind, amount in (("image", DEMO_CREDITS), ("tune", 1), ("tune_image", 64)):

            def give(conn: Any, kind: str = kind, amount: int = amount) -> Any:
                reference = f"demo-{new.id}-{kind}"
                return ledger.grant(conn, new.id, kind, amount, source="promo", reference=reference)

            run_transaction(engine, give)
        client = redis.Redis.from_url(get_settings().redis_url)
        photo = base64.b64encode(demo_photo()).decode()
        keys = []
        for spec in demo_specs(photo):
            key = f"demo-{secrets.token_hex(6)}"
            client.xadd(
                "tollgate:jobs",
                {"job": json.dumps({"account_id": new.id, "idempotency_key": key, "spec": spec})},
            )
            keys.append((key, spec["type"]))
        stack.quiet_terminal()  # the live line and the table, not every worker log line
        click.echo(f"process logs: {stack.log_path}")
        rows = _follow(engine, new.id, keys)
        _print_table(rows)
        _print_try_it(stack, new.api_key)
        if wait:
            stack.wait_forever()
        return 0 if all(r["status"] == "succeeded" for r in rows) else 1
    except (KeyboardInterrupt, Stop):
        return 0
    finally:
        click.echo("stopping ...")
        stack.stop()


def _find(engine: Any, account_id: str, key: str) -> dict[str, Any] | None:
    from sqlalchemy import select

    from orchestrator.tables import jobs as t

    row = run_transaction(
        engine,
        lambda c: c.execute(
            select(t.c.id).where(t.c.account_id == account_id, t.c.idempotency_key == key)
        ).first(),
    )
    return None if row is None else jobs.get(engine, account_id, row.id)


def _follow(engine: Any, account_id: str, keys: list[tuple[str, str]]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    found: dict[str, dict[str, Any]] = {}
    last = ""
    while time.monotonic() < deadline:
        for key, _type in keys:
            job = _find(engine, account_id, key)
            if job is not None:
                found[key] = job
        line = "  ".join(
            f"{t}:{found[k]['status']}"
            + (
                f"({found[k]['progress']['step']}/{found[k]['progress']['total']})"
                if k in found and found[k]["status"] == "running"
                else ""
            )
            if k in found
            else f"{t}:submitted"
            for k, t in keys
        )
        if sys.stdout.isatty():  # one live line
            sys.stdout.write(f"\r\033[K{line}"[:400])
            sys.stdout.flush()
        else:  # a log: a line per change of state, not per step
            states_now = " ".join(
                f"{t}:{found[k]['status']}" if k in found else f"{t}:submitted" for k, t in keys
            )
            if states_now != last:
                click.echo(states_now)
                last = states_now
        if len(found) == len(keys) and all(j["status"] in TERMINAL for j in found.values()):
            break
        time.sleep(0.3)
    sys.stdout.write("\n")
    return [found[k] for k, _ in keys if k in found]


def _print_table(rows: list[dict[str, Any]]) -> None:
    storage = get_storage()
    click.echo(
        f"\n{'job':<29}{'type':<18}{'price':>6}  {'status':<10}{'charged':>8}"
        f"{'refunded':>9}  output"
    )
    from sqlalchemy import select

    from orchestrator.tables import jobs as t

    for job in rows:

        def read(conn: Any, job_id: str = job["id"]) -> list[dict[str, Any]]:
            return list(conn.execute(select(t.c.outputs).where(t.c.id == job_id)).scalar_one())

        outputs = run_transaction(get_engine(), read)
        paths = [str(storage.local_path(o["key"])) for o in outputs if o.get("delivered")]
        where = (
            paths[0] + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else "")
            if paths
            else (job["error"] or "-")
        )
        if job["type"] == "tune" and job["status"] == "succeeded":
            sheet = storage.local_path(f"tunes/{job['id']}/contact_sheet.png")
            where = f"64 images; contact sheet {sheet}"
        kind = job["price"]["credit_kind"]
        click.echo(
            f"{job['id']:<29}{job['type']:<18}{job['price']['credits']:>6}  "
            f"{job['status']:<10}{job['charged']:>8}{job['refunded']:>9}  {where}"
            + (f" ({kind})" if job["type"] == "tune" else "")
        )
        if job["type"] == "tune":  # the 64-image render is held and charged in tune_image
            render = _tune_credits(job)
            held = render["held"] + render["charged"] + render["refunded"]
            click.echo(
                f"{'':<29}{'  + render':<18}{held:>6}  {'':<10}{render['charged']:>8}"
                f"{render['refunded']:>9}  (tune_image)"
            )


def _tune_credits(job: dict[str, Any]) -> dict[str, int]:
    from orchestrator.tunes.service import tune_view

    view = tune_view(get_engine(), get_storage(), job["account_id"], job["id"])
    found: dict[str, int] = view["credits"]["tune_image"]
    return found


def _print_try_it(stack: Standalone, api_key: str) -> None:
    api_url = stack.api_url
    click.echo(f"\n{stack.banner()}")
    click.echo(f"API key: {api_key}")
    click.echo(f"try: curl -H 'Authorization: Bearer {api_key}' {api_url}/v1/balance")
    click.echo("Ctrl-C stops everything.")
