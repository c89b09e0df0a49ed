"""The job service: submit, cancel, read. Each public function is one transaction.
A job family's extra work at submit comes from `orchestrator.jobs.kinds`.

Submit prices the spec, places the hold, writes the job row and its dispatch-queue entry
in ONE transaction; the scheduler sends the Celery task when a worker slot is free, in
fair order (orchestrator.scheduling.scheduler), through the outbox.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, Engine, bindparam, insert, select, update
from sqlalchemy.engine import Row

from billing import InsufficientCredits, InvalidJobSpec, ledger
from billing.clock import utcnow
from billing.db import run_transaction
from billing.ledger_pg import on_postgresql
from orchestrator.errors import OrchestratorError
from orchestrator.execution import leases
from orchestrator.jobs import kinds, specs, states, submission_pg, webhooks
from orchestrator.jobs.deadlines import deadline_s, hold_ttl_s
from orchestrator.jobs.families import family_for
from orchestrator.jobs.images import decode_b64, image_key, store_image
from orchestrator.jobs.records import (
    JobNotFound,
    OutputSigner,
    event_payload,
    get_row,
    lock_job,
    view,
)
from orchestrator.scheduling import outbox, scheduler
from orchestrator.settlement import alerts, lease_sweep
from orchestrator.settlement.settle import settler_for
from orchestrator.storage import Storage
from orchestrator.tables import IDEMPOTENCY_KEY_MAX_LEN, jobs

LIST_LIMIT_MAX: Final = 100
SOURCES: Final = ("http", "redis", "cli")


class IdempotencyConflict(OrchestratorError):
    """The same idempotency key with a different request body (HTTP 409)."""


class CannotCancel(OrchestratorError):
    """The job already ended another way (HTTP 409)."""


class JobRejected(OrchestratorError):
    """Refused at intake; the rejected job row is recorded. Carries the cause."""

    def __init__(self, job_id: str, cause: Exception) -> None:
        super().__init__(str(cause))
        self.job_id = job_id
        self.cause = cause


@dataclass(frozen=True)
class Submitted:
    job: dict[str, Any]
    created: bool


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


def request_hash(spec: Any, callback_url: str | None, events: list[str] | None = None) -> str:
    fields: dict[str, Any] = {"spec": spec, "callback_url": callback_url}
    if events is not None:  # absent from the hash when unset: older keys still match
        fields["webhook_events_filter"] = events
    body = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


# Built once: a statement's construction costs more than its execution on the hot path.
INSERT_JOB: Final = insert(jobs).returning(*jobs.c)
JOB_BY_ID: Final = select(jobs).where(jobs.c.id == bindparam("job_id"))
JOB_BY_KEY: Final = select(jobs).where(
    jobs.c.account_id == bindparam("account_id"),
    jobs.c.idempotency_key == bindparam("idempotency_key"),
)


def _job_values(
    job_id: str,
    account_id: str,
    spec: dict[str, Any],
    status: str,
    source: str,
    now: datetime,
    **values: Any,
) -> dict[str, Any]:
    return {
        "id": job_id,
        "account_id": account_id,
        "type": str(spec.get("type", "unknown"))[:20],
        "spec": spec,
        "status": status,
        "outputs": [],
        "source": source,
        "created_at": now,
        "updated_at": now,
        "attempt": 0,
        **values,
    }


def new_job_values(
    job_id: str,
    account_id: str,
    spec: dict[str, Any],
    price: Any,
    source: str,
    now: datetime,
    idempotency_key: str | None,
    digest: str,
    callback_url: str | None,
    events: list[str] | None,
) -> dict[str, Any]:
    """The row of a new `queued` job, priced (`price`: specs.validate's Price)."""
    return _job_values(
        job_id,
        account_id,
        spec,
        states.QUEUED,
        source,
        now,
        credit_kind=price.credit_kind,
        price=price.credits,
        price_per_output=price.breakdown.get("per_image", price.credits),
        outputs_expected=specs.outputs_expected(spec),
        idempotency_key=idempotency_key,
        request_hash=digest,
        callback_url=callback_url,
        webhook_events_filter=events,
        deadline_at=now + timedelta(seconds=deadline_s(spec)),
    )


def queued_event(values: dict[str, Any]) -> dict[str, Any]:
    """records.event_payload of the row `values` inserts (charged and refunded start at 0)."""
    return {
        "job_id": values["id"],
        "account_id": values["account_id"],
        "type": values["type"],
        "status": values["status"],
        "charged": 0,
        "refunded": 0,
        "error": "",
        "at": values["updated_at"].isoformat(),
    }


def _insert_and_hold_py(
    conn: Connection, values: dict[str, Any], ttl_s: int, now: datetime
) -> Row[Any]:
    """The embedded (SQLite) path of submission_pg.insert_and_hold, statement by statement."""
    row = conn.execute(INSERT_JOB, values).one()
    ledger.hold(
        conn,
        values["account_id"],
        values["credit_kind"],
        values["price"],
        reference=values["id"],
        ttl_s=ttl_s,
        now=now,
    )
    outbox.add(conn, "event", values["id"], event_payload(row))
    return row


def _resolve_image_input(
    conn: Connection, storage: Storage, account_id: str, spec: dict[str, Any]
) -> None:
    if "image_b64" in spec:
        spec["image_id"] = store_image(
            conn, storage, account_id, decode_b64(spec.pop("image_b64")), field="image_b64"
        )
    if "image_id" in spec:
        image_key(conn, account_id, spec["image_id"])  # exists and is the account's own


def submit(
    engine: Engine,
    storage: Storage,
    account_id: str,
    spec: Any,
    *,
    idempotency_key: str | None = None,
    callback_url: str | None = None,
    webhook_events_filter: Any = None,
    source: str = "http",
    job_id: str | None = None,
    account_known: bool = False,
) -> Submitted:
    """Price, hold and enqueue a job. Raises InvalidJobSpec (bad spec, nothing recorded),
    IdempotencyConflict, UnknownAccount, or JobRejected (insufficient credits: a `rejected`
    job is recorded, without the idempotency key so a retry after buying credits works).

    `job_id`: the id to use (the intake derives one per stream message, so a replay of a
    message finds the job, or the rejection, it already recorded). A rerun of the
    transaction after a lost commit answer finds its own row by id too.
    `account_known`: the caller knows the account exists (an API key of it was just
    checked; accounts are never deleted), so its row is not read first."""
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= IDEMPOTENCY_KEY_MAX_LEN:
        raise InvalidJobSpec("idempotency_key", f"must be 1..{IDEMPOTENCY_KEY_MAX_LEN} characters")
    callback_url = specs.validate_callback_url(callback_url)
    events = webhooks.validate_events_filter(webhook_events_filter)
    digest = request_hash(spec, callback_url, events)

    def existing(conn: Connection) -> Row[Any] | None:
        if idempotency_key is None:
            return None
        params = {"account_id": account_id, "idempotency_key": idempotency_key}
        row = conn.execute(JOB_BY_KEY, params).first()
        if row is not None and row.request_hash != digest:
            raise IdempotencyConflict(
                f"idempotency key {idempotency_key!r} was used with a different request"
            )
        return row

    # The idempotency check runs inside the submit transaction (one round of commits per job,
    # the hot path of the Redis intake); a replay never reaches the hold.
    try:
        normalised, price = specs.validate(spec)
    except InvalidJobSpec:
        run_transaction(engine, existing)  # a reused key with another body is a 409 first
        raise
    # A fresh id cannot have a row yet on the first attempt; a rerun (after a lost commit
    # answer) and a caller's id (a replayed message) look for it.
    fresh = job_id is None
    job_id = job_id or new_job_id()
    attempts = 0

    def work(conn: Connection) -> Row[Any]:
        nonlocal attempts
        attempts += 1
        again = existing(conn)
        if again is not None:  # a replay, or a concurrent retry that won the race
            return again
        own = None if fresh and attempts == 1 else _own_row(conn, job_id, account_id)
        if own is not None:
            if own.status == states.REJECTED:  # this message was refused before
                raise InsufficientCredits(
                    own.credit_kind,
                    own.price,
                    ledger.get_balance(conn, account_id, own.credit_kind).available,
                )
            return own  # this very submit committed before (the answer was lost)
        if not account_known:
            ledger.get_account(conn, account_id)  # UnknownAccount before any insert
        spec_ = dict(normalised)
        kind = kinds.kind_for(spec_["type"])
        if kind.before_insert is not None:
            kind.before_insert(conn, account_id, spec_)
        elif kind.takes_input_image:
            _resolve_image_input(conn, storage, account_id, spec_)
        now = utcnow()
        values = new_job_values(
            job_id,
            account_id,
            spec_,
            price,
            source,
            now,
            idempotency_key,
            digest,
            callback_url,
            events,
        )
        ttl_s = hold_ttl_s(spec_)
        ledger.check_hold(price.credit_kind, price.credits, ttl_s, job_id)
        task = spec_["type"]
        # The job waits for a worker slot, in fair order (the dispatcher sends its task).
        # PostgreSQL: one statement holds, inserts the job and its event row, looks the alert
        # up and (unless the family writes its own rows after the hold) enqueues the job.
        enqueued = on_postgresql(conn) and kind.after_hold is None
        if on_postgresql(conn):
            row, has_alert = submission_pg.insert_and_hold(
                conn,
                values,
                ttl_s,
                queued_event(values),
                now,
                enqueue=(task, family_for(task).queue) if enqueued else None,
            )
        else:
            row = _insert_and_hold_py(conn, values, ttl_s, now)
            has_alert = True  # alerts.check reads the alert row itself
        if has_alert:
            alerts.check(conn, account_id, price.credit_kind, now, job_id)
        if kind.after_hold is not None:
            kind.after_hold(conn, storage, job_id, account_id, spec_, now)
        if not enqueued:
            scheduler.enqueue(conn, job_id, task, account_id, now, new=True)
        return row

    kind_ = kinds.kind_for(normalised["type"])
    direct = (
        fresh
        and idempotency_key is None
        and engine.dialect.name == "postgresql"
        and kind_.before_insert is None
        and kind_.after_hold is None
        and not (
            kind_.takes_input_image and ("image_b64" in normalised or "image_id" in normalised)
        )
    )
    try:
        row = None
        if direct:
            row = _submit_direct(
                engine, job_id, account_id, normalised, price, source, digest, callback_url, events
            )
            if row is None:
                fresh = False  # the full path looks for this job's own row first
        if row is None:
            row = run_transaction(engine, work)
    except InsufficientCredits as exc:
        _record_rejection(
            engine,
            job_id,
            account_id,
            normalised,
            source,
            price.credit_kind,
            price.credits,
            str(exc),
        )
        raise JobRejected(job_id, exc) from exc
    return Submitted(view(row), created=row.id == job_id)


def _submit_direct(
    engine: Engine,
    job_id: str,
    account_id: str,
    spec: dict[str, Any],
    price: Any,
    source: str,
    digest: str,
    callback_url: str | None,
    events: Any,
) -> Row[Any] | None:
    """The usual submit on PostgreSQL (a new job, no idempotency key, a family without rows
    of its own) as one statement that is its own transaction (submission_pg.submit_alone),
    then a low-balance alert's check (alerts.check_after). None after a transient fault or
    a conflict: the caller then runs the full path, which finds this job if it committed."""
    spec_ = dict(spec)
    now = utcnow()
    values = new_job_values(
        job_id, account_id, spec_, price, source, now, None, digest, callback_url, events
    )
    ttl_s = hold_ttl_s(spec_)
    ledger.check_hold(price.credit_kind, price.credits, ttl_s, job_id)
    task = spec_["type"]
    done = submission_pg.submit_alone(
        engine, values, ttl_s, queued_event(values), now, (task, family_for(task).queue)
    )
    if done is None:
        return None
    row, has_alert = done
    if has_alert:
        alerts.check_after(engine, account_id, price.credit_kind, now, job_id)
    return row


def _own_row(conn: Connection, job_id: str, account_id: str) -> Row[Any] | None:
    row = conn.execute(JOB_BY_ID, {"job_id": job_id}).first()
    if row is not None and row.account_id != account_id:
        raise OrchestratorError(f"job id {job_id} belongs to another account")
    return row


def _record_rejection(
    engine: Engine,
    job_id: str,
    account_id: str,
    spec: dict[str, Any],
    source: str,
    credit_kind: str,
    price: int,
    reason: str,
) -> None:
    stored = {k: v for k, v in spec.items() if k not in ("image_b64", "images_b64")}

    def work(conn: Connection) -> None:
        if _own_row(conn, job_id, account_id) is not None:
            return  # recorded already (a replayed message, or a lost commit answer)
        now = utcnow()
        params = _job_values(
            job_id,
            account_id,
            stored,
            states.REJECTED,
            source,
            now,
            credit_kind=credit_kind,
            price=price,
            price_per_output=0,
            outputs_expected=0,
            error=reason,
            deadline_at=now,
            finished_at=now,
        )
        row = conn.execute(INSERT_JOB, params).one()
        outbox.add(conn, "event", job_id, event_payload(row))

    run_transaction(engine, work)


def get(
    engine: Engine, account_id: str | None, job_id: str, sign: OutputSigner | None = None
) -> dict[str, Any]:
    """A job, if it is `account_id`'s (None: any account, for operators); `sign` gives its
    outputs expiring URLs (records.view)."""

    def work(conn: Connection) -> dict[str, Any] | None:
        row = conn.execute(JOB_BY_ID, {"job_id": job_id}).first()
        if row is None or (account_id is not None and row.account_id != account_id):
            return None
        # An attempt starts with the job's start (execution.protocol): none before.
        attempts = leases.attempts(conn, job_id) if row.started_at is not None else []
        return {**view(row, sign), "attempts": attempts}

    found = run_transaction(engine, work)
    if found is None:
        raise JobNotFound(job_id)
    return found


def list_jobs(
    engine: Engine,
    account_id: str | None,
    *,
    status: str | None = None,
    limit: int = 20,
    sign: OutputSigner | None = None,
) -> list[dict[str, Any]]:
    if status is not None and status not in states.STATUSES:
        raise InvalidJobSpec("status", f"must be one of {', '.join(states.STATUSES)}")
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise InvalidJobSpec("limit", f"must be in 1..{LIST_LIMIT_MAX}")
    stmt = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
    if account_id is not None:
        stmt = stmt.where(jobs.c.account_id == account_id)
    if status is not None:
        stmt = stmt.where(jobs.c.status == status)
    return [view(r, sign) for r in run_transaction(engine, lambda conn: conn.execute(stmt).all())]


def cancel(engine: Engine, account_id: str | None, job_id: str) -> dict[str, Any]:
    """Queued or dispatched: refunded now. Running: the worker stops at its next step and the
    job is charged only for outputs already delivered. Ended: CannotCancel (canceled: as is)."""

    def work(conn: Connection) -> Row[Any]:
        get_row(conn, account_id, job_id)
        row = lock_job(conn, job_id)
        now = utcnow()
        settle_ = settler_for(row)
        if row.status in (states.QUEUED, states.DISPATCHED, states.AWAITING_CREDITS):
            return settle_(conn, row, states.CANCELED, 0, now, "canceled by the client")
        if row.status in (states.RUNNING, states.TRAINING, states.RENDERING):
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(cancel_requested=True, updated_at=now)
                .returning(*jobs.c)
            ).one()
            if leases.is_expired(row, now):  # its worker is gone: nobody else will stop it
                lease_sweep.recover(conn, row, now)
                return conn.execute(select(jobs).where(jobs.c.id == job_id)).one()
            return row
        if row.status == states.CANCELED:
            return row
        raise CannotCancel(f"job {job_id} is already {row.status}")

    return view(run_transaction(engine, work))
