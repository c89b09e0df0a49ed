"""The reaper (Celery beat): expire jobs stuck past their deadline and release their holds;
expire ledger holds and grants that are past due (the ledger's own backstop)."""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import Connection, Engine, select

from billing import ledger
from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.jobs import states
from orchestrator.jobs.records import lock_job
from orchestrator.settlement import alerts
from orchestrator.settlement.settle import settler_for
from orchestrator.tables import jobs

REAP_BATCH_MAX: Final = 200


def reap(engine: Engine, now: datetime | None = None, limit: int = REAP_BATCH_MAX) -> list[str]:
    """Expire overdue active jobs (one transaction each). Returns their ids."""
    now = now or utcnow()
    due = run_transaction(
        engine,
        lambda c: list(
            c.execute(
                select(jobs.c.id)
                .where(jobs.c.status.in_(sorted(states.ACTIVE)), jobs.c.deadline_at <= now)
                .order_by(jobs.c.deadline_at)
                .limit(limit)
            ).scalars()
        ),
    )
    expired = []
    for job_id in due:

        def work(conn: Connection, job_id: str = job_id) -> bool:
            row = lock_job(conn, job_id)
            if states.is_terminal(row.status) or row.deadline_at > now:
                return False
            settler_for(row)(
                conn, row, states.EXPIRED, 0, now, "deadline passed before the job ended"
            )
            return True

        if run_transaction(engine, work):
            expired.append(job_id)
    for reference in run_transaction(engine, lambda c: ledger.due_holds(c, now, limit)):

        def expire_one(conn: Connection, reference: str = reference) -> None:
            _expire_hold(conn, reference, now)

        run_transaction(engine, expire_one)
    run_transaction(engine, lambda c: alerts.expire_grants_and_check(c, now))
    return expired


def _expire_hold(conn: Connection, reference: str, now: datetime) -> None:
    hold = ledger.get_hold(conn, reference)
    if hold is not None and hold.status == "open" and hold.expires_at <= now:
        ledger.expire(conn, reference, now=now)
        alerts.check(conn, hold.account_id, hold.kind, now)
