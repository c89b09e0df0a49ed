"""Output retention by plan: a job's stored outputs (and a tune's contact sheet) are deleted
`output_retention_free_days` after the job ends on the free plan, `output_retention_paid_days`
on standard and business; uploaded input images the same time after their upload. The
account's plan at sweep time counts.

The sweeper deletes in bounded batches (beat task `tollgate.outputs`), objects first, then
marks the row (`jobs.outputs_deleted_at`, `images.deleted_at`): a crash in between deletes
again next time (deletes are idempotent). The job row, its outputs list and the ledger keep
everything; a deleted output answers 410 on both URL kinds."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, Engine, and_, or_, select, update

from billing.clock import utcnow
from billing.db import run_transaction
from billing.tables import accounts
from orchestrator.settings import get_settings
from orchestrator.settlement.retention import PAID_PLANS
from orchestrator.storage import Storage
from orchestrator.tables import images, jobs, tunes

# Jobs (and images) handled per sweep call; the beat task runs it every few minutes.
SWEEP_BATCH_MAX: Final = 200


@dataclass(frozen=True)
class Swept:
    jobs: list[str]
    images: list[str]


def _due(column: Any, now: datetime) -> Any:
    settings = get_settings()
    paid = now - timedelta(days=settings.output_retention_paid_days)
    free = now - timedelta(days=settings.output_retention_free_days)
    return or_(
        and_(accounts.c.plan.in_(PAID_PLANS), column <= paid),
        and_(accounts.c.plan.not_in(PAID_PLANS), column <= free),
    )


def due_jobs(
    conn: Connection, now: datetime, limit: int, account_id: str | None = None
) -> list[Any]:
    stmt = (
        select(jobs.c.id, jobs.c.type, jobs.c.outputs)
        .join(accounts, accounts.c.id == jobs.c.account_id)
        .where(
            jobs.c.finished_at.is_not(None),
            jobs.c.outputs_deleted_at.is_(None),
            _due(jobs.c.finished_at, now),
        )
        .order_by(jobs.c.finished_at)
        .limit(limit)
    )
    if account_id is not None:
        stmt = stmt.where(jobs.c.account_id == account_id)
    return list(conn.execute(stmt))


def due_images(
    conn: Connection, now: datetime, limit: int, account_id: str | None = None
) -> list[Any]:
    stmt = (
        select(images.c.id, images.c.path)
        .join(accounts, accounts.c.id == images.c.account_id)
        .where(images.c.deleted_at.is_(None), _due(images.c.created_at, now))
        .order_by(images.c.created_at)
        .limit(limit)
    )
    if account_id is not None:
        stmt = stmt.where(images.c.account_id == account_id)
    return list(conn.execute(stmt))


def sweep_outputs(
    engine: Engine,
    storage: Storage,
    now: datetime | None = None,
    limit: int = SWEEP_BATCH_MAX,
    account_id: str | None = None,
) -> Swept:
    """Delete up to `limit` jobs' expired outputs and `limit` expired input images (of one
    account with `account_id`: what `now` makes due for it, e.g. with a test's clock)."""
    at = now or utcnow()
    limit = max(1, min(limit, SWEEP_BATCH_MAX))
    job_rows = run_transaction(engine, lambda c: due_jobs(c, at, limit, account_id))
    for job in job_rows:
        for output in job.outputs or []:
            if output.get("key"):
                storage.delete(output["key"])
        if job.type == "tune":
            storage.delete(f"tunes/{job.id}/contact_sheet.png")
    image_rows = run_transaction(engine, lambda c: due_images(c, at, limit, account_id))
    for image in image_rows:
        storage.delete(image.path)

    def mark(conn: Connection) -> None:
        job_ids = [j.id for j in job_rows]
        if job_ids:
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(job_ids), jobs.c.outputs_deleted_at.is_(None))
                .values(outputs_deleted_at=at)
            )
            conn.execute(
                update(tunes).where(tunes.c.id.in_(job_ids)).values(contact_sheet_key=None)
            )
        image_ids = [i.id for i in image_rows]
        if image_ids:
            conn.execute(
                update(images)
                .where(images.c.id.in_(image_ids), images.c.deleted_at.is_(None))
                .values(deleted_at=at)
            )

    run_transaction(engine, mark)
    return Swept([j.id for j in job_rows], [i.id for i in image_rows])
