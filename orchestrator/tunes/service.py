"""Tunes: a LoRA trained on a user's photos that finishes by rendering 64 images
(8 styles x 8). The job row (same id) carries status, progress and outputs; `tunes` the rest.

Credits (two holds):
- submit holds 1 `tune` credit (reference = tune id) and, when available, 64 `tune_image`
  credits (reference `<id>:render:<n>`); without them the tune still trains, then waits in
  `awaiting_credits` until a grant (or POST /v1/tunes/{id}/render) lets it render.
- training success commits the tune credit; training failure releases both holds.
- the render commits one tune_image credit per delivered image and releases the rest.
Retention: a free plan's weights are deleted `tune_retention_free_days` after training; a
paid plan keeps them until `tune_retention_lapsed_days` after the plan lapses.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.engine import Row

from billing import InsufficientCredits, InvalidJobSpec, ledger
from billing.clock import utcnow
from billing.db import run_transaction
from billing.pricing import TUNE_RENDER_IMAGES_PER_PROMPT, TUNE_RENDER_PROMPTS
from billing.tables import accounts
from orchestrator.errors import OrchestratorError
from orchestrator.execution.protocol import Phase
from orchestrator.jobs import kinds, states
from orchestrator.jobs.deadlines import HOLD_GRACE_S, QUEUE_ALLOWANCE_S
from orchestrator.jobs.images import decode_b64, image_key, store_image
from orchestrator.jobs.records import JobNotFound, OutputSigner, lock_job, transition, view
from orchestrator.scheduling import scheduler
from orchestrator.settlement import alerts
from orchestrator.settlement.retention import expires_at_for
from orchestrator.storage import Storage
from orchestrator.tables import jobs, tunes
from orchestrator.tunes.checkpoints import checkpoint_key

RENDER_IMAGES: Final = TUNE_RENDER_PROMPTS * TUNE_RENDER_IMAGES_PER_PROMPT
RENDER_TASK: Final = "tune_render"
RENDER_DEADLINE_S: Final = QUEUE_ALLOWANCE_S + 3600
TOKEN_LETTERS: Final = "bcdfghjklmnpqrstvwxz"  # consonant strings are rare in CLIP's vocab
TOKEN_LEN: Final = 5


class TuneGone(OrchestratorError):
    """The tune's weights were deleted by retention (HTTP 410)."""


class TuneNotReady(OrchestratorError):
    """The tune is not in a state that allows this (HTTP 409)."""


def new_token() -> str:
    return "".join(secrets.choice(TOKEN_LETTERS) for _ in range(TOKEN_LEN))


def render_ref(tune_id: str, n: int) -> str:
    return f"{tune_id}:render:{n}"


def get_tune(conn: Connection, tune_id: str) -> Row[Any]:
    row = conn.execute(select(tunes).where(tunes.c.id == tune_id)).first()
    if row is None:
        raise JobNotFound(tune_id)
    return row


# --------------------------------------------------------------------- submit


def on_submit(
    conn: Connection,
    storage: Storage,
    job_id: str,
    account_id: str,
    spec: dict[str, Any],
    now: datetime,
) -> None:
    """In the submit transaction, after the job row and its tune-credit hold: store the
    photos, create the tune, and hold the 64 tune_image credits if the account has them."""
    if "images_b64" in spec:
        ids = [
            store_image(conn, storage, account_id, decode_b64(b, "images_b64"), "images_b64")
            for b in spec.pop("images_b64")
        ]
        spec["image_ids"] = ids
    keys = [image_key(conn, account_id, i) for i in spec["image_ids"]]
    conn.execute(update(jobs).where(jobs.c.id == job_id).values(spec=spec))
    conn.execute(
        insert(tunes).values(
            id=job_id,
            account_id=account_id,
            name=spec["name"],
            subject=spec["subject"],
            token=new_token(),
            base_model=spec["base_model"],
            styles=spec["styles"],
            training=spec["training"],
            image_keys=keys,
            seed=secrets.randbelow(2**31),
            render_count=0,
            created_at=now,
        )
    )
    _try_render_hold(conn, job_id, account_id, now)


def on_prompt_submit(conn: Connection, account_id: str, spec: dict[str, Any]) -> None:
    """A later render from a trained tune: check the tune (yours, trained, not expired) and
    complete the spec from it (prompt from the style, the tune's base model)."""
    from orchestrator.jobs.styles import get_catalogue

    tune = get_tune(conn, spec["tune_id"])
    if tune.account_id != account_id:
        raise JobNotFound(spec["tune_id"])
    if tune.weights_deleted_at is not None:
        raise TuneGone(f"tune {tune.id} expired: its weights were deleted")
    if tune.lora_key is None:
        raise TuneNotReady(f"tune {tune.id} is not trained yet")
    subject = f"{tune.token} {tune.subject}"
    if spec.get("style") is not None:
        style = get_catalogue().get(spec.pop("style"))
        spec["prompt"] = style.prompt(tune.token, tune.subject)
        spec.setdefault("negative_prompt", style.negative_prompt)
        spec["guidance"] = spec.get("guidance", style.guidance)
    elif tune.token not in spec["prompt"]:
        raise InvalidJobSpec(
            "prompt", f"must contain the tune's token {tune.token!r} (e.g. 'a photo of {subject}')"
        )
    spec["model"] = tune.base_model


def _try_render_hold(conn: Connection, tune_id: str, account_id: str, now: datetime) -> bool:
    """Place the next 64-credit render hold if the account has the credits."""
    tune = get_tune(conn, tune_id)
    ref = render_ref(tune_id, tune.render_count + 1)
    try:
        ledger.hold(
            conn,
            account_id,
            "tune_image",
            RENDER_IMAGES,
            reference=ref,
            ttl_s=RENDER_DEADLINE_S + HOLD_GRACE_S,
            now=now,
        )
    except InsufficientCredits:
        return False
    alerts.check(conn, account_id, "tune_image", now, tune_id)
    conn.execute(
        update(tunes)
        .where(tunes.c.id == tune_id)
        .values(render_hold_ref=ref, render_count=tune.render_count + 1)
    )
    return True


def _open_render_hold(conn: Connection, tune: Row[Any]) -> ledger.Hold | None:
    if tune.render_hold_ref is None:
        return None
    hold = ledger.get_hold(conn, tune.render_hold_ref)
    return hold if hold is not None and hold.status == "open" else None


# --------------------------------------------------------------------- settlement


def _release_all(conn: Connection, row: Row[Any], now: datetime) -> int:
    """Release the tune hold and any render hold; returns tune credits refunded."""
    refunded = 0
    tune_hold = ledger.get_hold(conn, row.id)
    if tune_hold is not None and tune_hold.status == "open":
        ledger.release(conn, row.id, now=now)
        refunded = tune_hold.amount
    render = _open_render_hold(conn, get_tune(conn, row.id))
    if render is not None:
        ledger.release(conn, render.reference, now=now)
    alerts.check_all(conn, row.account_id, now, row.id)
    return refunded


def settle_training(
    conn: Connection,
    row: Row[Any],
    status: str,
    delivered: int,
    now: datetime,
    error: str | None,
) -> Row[Any]:
    """End the training phase: success commits the tune credit and moves on to rendering
    (or awaiting_credits); anything else releases both holds. Either way the training photos
    and the stored training checkpoint are deleted (a rollback after this point leaves a retry
    without photos: it fails and is refunded, never charged)."""
    from orchestrator.storage import get_storage

    for key in get_tune(conn, row.id).image_keys:
        get_storage().delete(key)
    get_storage().delete(checkpoint_key(row.id))
    conn.execute(update(tunes).where(tunes.c.id == row.id).values(image_keys=[]))
    if status != states.SUCCEEDED:
        refunded = _release_all(conn, row, now)
        return transition(
            conn, row.id, status, now, refunded=refunded, error=error, lease_token=None
        )
    tune_hold = ledger.get_hold(conn, row.id)
    if tune_hold is not None and tune_hold.status == "open":
        tune_hold = ledger.commit(conn, row.id, tune_hold.amount, now=now)
    # What the ledger says was charged (a hold its sweeper expired charged nothing).
    charged = tune_hold.committed if tune_hold is not None else 0
    account = conn.execute(select(accounts).where(accounts.c.id == row.account_id)).one()

    conn.execute(
        update(tunes)
        .where(tunes.c.id == row.id)
        .values(
            trained_at=now, expires_at=expires_at_for(account.plan, account.plan_lapsed_at, now)
        )
    )
    tune = get_tune(conn, row.id)
    common = {
        "charged": charged,
        "refunded": row.price - charged,
        "attempt": 0,
        "lease_token": None,
        "error": None,
    }
    if _open_render_hold(conn, tune) is None:
        return transition(conn, row.id, states.AWAITING_CREDITS, now, **common)
    return _start_render(conn, row.id, now, **common)


def _start_render(conn: Connection, tune_id: str, now: datetime, **values: Any) -> Row[Any]:
    row = transition(
        conn,
        tune_id,
        states.RENDERING,
        now,
        outputs=[],
        progress_step=0,
        deadline_at=now + timedelta(seconds=RENDER_DEADLINE_S),
        cancel_requested=False,
        **values,
    )
    scheduler.enqueue(conn, tune_id, RENDER_TASK, row.account_id, now)
    return row


def settle_render(
    conn: Connection,
    row: Row[Any],
    status: str,
    delivered: int,
    now: datetime,
    error: str | None,
) -> Row[Any]:
    """End the render: one tune_image credit per delivered image, the rest released."""
    hold = _open_render_hold(conn, get_tune(conn, row.id))
    if hold is not None:
        charge = min(delivered, hold.amount) if status != states.FAILED else 0
        if charge:
            ledger.commit(conn, hold.reference, charge, now=now)
        else:
            ledger.release(conn, hold.reference, now=now)
        alerts.check(conn, row.account_id, "tune_image", now, row.id)
    return transition(conn, row.id, status, now, error=error, lease_token=None)


def settle_waiting(
    conn: Connection,
    row: Row[Any],
    status: str,
    delivered: int,
    now: datetime,
    error: str | None,
) -> Row[Any]:
    """A trained tune with no render running: nothing is held, only the state changes."""
    return transition(conn, row.id, status, now, error=error)


def settler_for(row: Row[Any]) -> Any:
    """The settle function for a tune's current phase (plain jobs: None)."""
    if row.type != "tune":
        return None
    if row.status == states.RENDERING:
        return settle_render
    if row.status in (states.AWAITING_CREDITS, states.SUCCEEDED):
        return settle_waiting
    return settle_training


TRAINING_PHASE: Final = Phase(
    running_status=states.TRAINING,
    startable=frozenset({states.QUEUED, states.DISPATCHED, states.TRAINING}),
    settle=settle_training,
    outputs_required=False,
)
RENDER_PHASE: Final = Phase(
    running_status=states.RENDERING,
    startable=frozenset({states.RENDERING}),
    settle=settle_render,
)


# --------------------------------------------------------------------- renders


def start_render(engine: Engine, account_id: str, tune_id: str) -> dict[str, Any]:
    """POST /v1/tunes/{id}/render: hold 64 tune_image credits and render a tune waiting for
    them. InsufficientCredits (402) when they are not there; TuneGone (410) after retention."""

    def work(conn: Connection) -> Row[Any]:
        tune = get_tune(conn, tune_id)
        if tune.account_id != account_id:
            raise JobNotFound(tune_id)
        row = lock_job(conn, tune_id)
        if tune.weights_deleted_at is not None:
            raise TuneGone(f"tune {tune_id} expired: its weights were deleted")
        if row.status != states.AWAITING_CREDITS:
            raise TuneNotReady(f"tune {tune_id} is {row.status}, not awaiting_credits")
        now = utcnow()
        if not _try_render_hold(conn, tune_id, account_id, now):
            available = ledger.get_balance(conn, account_id, "tune_image", now=now).available
            raise InsufficientCredits("tune_image", RENDER_IMAGES, available)
        return _start_render(conn, tune_id, now, attempt=0)

    return view(run_transaction(engine, work))


def start_waiting_renders(engine: Engine, account_id: str | None = None) -> list[str]:
    """After tune_image credits arrive: render tunes in awaiting_credits, oldest first, as far
    as the credits reach. Called after grants and by beat (for any grant path)."""
    stmt = (
        select(tunes.c.id, tunes.c.account_id)
        .join(jobs, jobs.c.id == tunes.c.id)
        .where(jobs.c.status == states.AWAITING_CREDITS, tunes.c.weights_deleted_at.is_(None))
        .order_by(tunes.c.trained_at, tunes.c.id)
    )
    if account_id is not None:
        stmt = stmt.where(tunes.c.account_id == account_id)
    waiting = run_transaction(engine, lambda c: c.execute(stmt).all())
    started, broke = [], set()
    for tune_id, owner in waiting:
        if owner in broke:
            continue
        try:
            start_render(engine, owner, tune_id)
            started.append(tune_id)
        except InsufficientCredits:
            broke.add(owner)  # oldest first: later tunes of this account wait too
        except TuneNotReady:
            continue
    return started


def tune_view(
    engine: Engine,
    storage: Storage,
    account_id: str | None,
    tune_id: str,
    sign: OutputSigner | None = None,
) -> dict[str, Any]:
    """GET /v1/tunes/{id}: the job view plus the tune's own fields and credits per kind."""

    def work(conn: Connection) -> tuple[Row[Any], Row[Any], list[ledger.Hold]]:
        tune = get_tune(conn, tune_id)
        if account_id is not None and tune.account_id != account_id:
            raise JobNotFound(tune_id)
        row = conn.execute(select(jobs).where(jobs.c.id == tune_id)).one()
        refs = [tune_id] + [render_ref(tune_id, n) for n in range(1, tune.render_count + 1)]
        holds = [h for r in refs if (h := ledger.get_hold(conn, r)) is not None]
        return tune, row, holds

    tune, row, holds = run_transaction(engine, work)
    credits: dict[str, dict[str, int]] = {
        kind: {"held": 0, "charged": 0, "refunded": 0} for kind in ("tune", "tune_image")
    }
    for h in holds:
        c = credits[h.kind]
        if h.status == "open":
            c["held"] += h.amount
        else:
            c["charged"] += h.committed
            c["refunded"] += h.amount - h.committed
    out = view(row, sign)
    out.update(
        {
            "name": tune.name,
            "subject": tune.subject,
            "token": tune.token,
            "base_model": tune.base_model,
            "styles": tune.styles,
            "contact_sheet": (
                f"/v1/tunes/{tune_id}/contact_sheet" if tune.contact_sheet_key else None
            ),
            "trained_at": tune.trained_at.isoformat() if tune.trained_at else None,
            "expires_at": tune.expires_at.isoformat() if tune.expires_at else None,
            "weights_deleted": tune.weights_deleted_at is not None,
            "credits": credits,
        }
    )
    return out


# The tune family's part of submit and settlement (the job service never imports tunes).
kinds.register(
    "tune",
    kinds.Kind(after_hold=on_submit, settler_for=settler_for, takes_input_image=False),
)
kinds.register("tune_prompt", kinds.Kind(before_insert=on_prompt_submit))
