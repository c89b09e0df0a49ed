"""`finish`: apply an attempt's result once (record outputs and progress, close the attempt,
record the result, settle), whatever happened to the job meanwhile.

On PostgreSQL a plain job whose current attempt finishes (no webhook, no outputs recorded
before) is settled by one call of the PL/pgSQL function `tollgate_job_finish` (migration
0011): under the job's row lock it does what the Python path below does, in one round trip:
the outputs and final progress, the attempt's end, the job_results row, the ledger's
commit or release (tollgate_ledger_resolve), the job's end and its `event` outbox row; the
same statement gives the scheduler its slot back (flows.release_ctes). What stays in
Python, in the same transaction: when the account has a low-balance alert, its check. The
function returns `fallback` (changing nothing) whenever the job needs the Python path.
"""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any, Final

from sqlalchemy import Connection, Engine, insert, select, update

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.db_direct import run_statement
from orchestrator.execution import leases
from orchestrator.execution.attempt import (
    FINISH_RETRY_BUDGET_S,
    JOB_PHASE,
    STEP_ATTEMPTS_MAX,
    Attempt,
    Phase,
    Price,
)
from orchestrator.execution.context import RunContext, merged
from orchestrator.jobs import states
from orchestrator.jobs.records import lock_job
from orchestrator.scheduling import flows
from orchestrator.settings import get_settings
from orchestrator.settlement import alerts
from orchestrator.tables import job_results, jobs

_PG_FINISH_SQL: Final = (
    "SELECT r_status, r_alert, r_account_id, r_credit_kind FROM tollgate_job_finish("
    "%(job)s::text, %(attempt)s::integer, %(token)s::text, %(outcome)s::text,"
    " %(status)s::text, %(error)s::text, %(reason)s::text, %(outputs)s::json,"
    " %(delivered)s::integer, %(charge)s::bigint, %(step)s::integer, %(total)s::integer,"
    " %(now)s::timestamp, %(at)s::text)"
)
FALLBACK: Final = "fallback"
# The call and the scheduler's release of the slot (the statement scheduler.release runs,
# as CTEs) in one round trip: the release runs only when the call ended the phase (not a
# fallback, not a result recorded before: then r_alert is NULL).
_PG_FINISH_RELEASE_SQL: Final = (
    f"WITH fin AS MATERIALIZED ({_PG_FINISH_SQL}), "
    + flows.release_ctes(
        f"EXISTS (SELECT 1 FROM fin WHERE fin.r_status <> '{FALLBACK}' AND fin.r_alert IS NOT NULL)"
    )
    + " SELECT r_status, r_alert, r_account_id, r_credit_kind FROM fin"
)


def finish(
    engine: Engine,
    attempt: Attempt,
    outcome: str,
    error: str | None = None,
    phase: Phase = JOB_PHASE,
    ctx: RunContext | None = None,
    budget_s: float = FINISH_RETRY_BUDGET_S,
) -> str:
    """Apply an attempt's result once: record the outputs and final progress `ctx` has not
    written yet, then settle. Returns the job's status afterwards. Retried through transient
    faults for up to `budget_s`; a rerun after a lost commit answer finds this attempt's
    result already recorded and returns the status it left."""
    assert outcome in (states.SUCCEEDED, states.FAILED, states.CANCELED), outcome
    one_call = (
        phase is JOB_PHASE
        and ctx is not None
        and not ctx.recorded_any
        and attempt.price is not None
    )

    if one_call and engine.dialect.name == "postgresql":
        assert ctx is not None and attempt.price is not None
        status = _finish_pg(engine, attempt, outcome, error, ctx, attempt.price, budget_s)
        if status != FALLBACK:
            return status
    return run_transaction(
        engine,
        lambda conn: _finish(conn, attempt, outcome, error, phase, ctx),
        attempts_max=STEP_ATTEMPTS_MAX,
        budget_s=budget_s,
    )


def outcome_of(
    outcome: str,
    error: str | None,
    outputs: list[dict[str, Any]],
    outputs_expected: int,
    outputs_required: bool,
) -> tuple[str, str | None, int]:
    """(the job's status, its error, outputs charged) for a current attempt's result. A
    failed job is refunded in full; a canceled or partial one pays for what it got."""
    delivered = sum(1 for o in outputs if o.get("delivered"))
    status, reason = outcome, error
    if status == states.SUCCEEDED and not delivered and outputs_required:
        status, reason = states.FAILED, reason or _undelivered_reason(outputs)
    missing = outputs_expected - delivered
    if status == states.SUCCEEDED and missing > 0 and reason is None and outputs_required:
        reason = (
            f"{missing} of {outputs_expected} outputs not delivered: {_undelivered_reason(outputs)}"
        )
    return status, reason, 0 if status == states.FAILED else delivered


def _finish_pg(
    engine: Engine,
    attempt: Attempt,
    outcome: str,
    error: str | None,
    ctx: RunContext,
    price: Price,
    budget_s: float,
) -> str:
    """The one-call finish: a transaction of its own on a direct connection
    (orchestrator.db_direct), durable when it returns; a low-balance alert's check follows
    (alerts.check_after)."""
    # The row holds no outputs yet (the function checks): what it will hold is `ctx`'s.
    outputs = merged([], ctx.unrecorded)
    status, reason, charged_outputs = outcome_of(
        outcome, error, outputs, price.outputs_expected, True
    )
    outputs_json = json.dumps(outputs)
    delivered = sum(1 for o in outputs if o.get("delivered"))
    charge = min(price.credits, price.per_output * charged_outputs)
    now = utcnow()

    def params() -> dict[str, Any]:
        nonlocal now
        now = utcnow()
        return {
            "job": attempt.job_id,
            "attempt": attempt.number,
            "token": attempt.token,
            "outcome": outcome,
            "status": status,
            "error": error,
            "reason": reason,
            "outputs": outputs_json,
            "delivered": delivered,
            "charge": charge,
            "step": ctx.step if ctx.total else None,
            "total": ctx.total if ctx.total else None,
            "now": now.astimezone(UTC).replace(tzinfo=None),
            "at": now.isoformat(),
            "release_now_s": now.timestamp(),
            "release_aging": float(get_settings().sched_aging_per_s),
        }

    row = run_statement(
        engine, _PG_FINISH_RELEASE_SQL, params, attempts_max=STEP_ATTEMPTS_MAX, budget_s=budget_s
    )
    # (a fallback, or a result recorded before, changed nothing; else the slot is free)
    if row.r_alert:
        alerts.check_after(
            engine,
            row.r_account_id,
            row.r_credit_kind,
            now,
            attempt.job_id,
            attempts_max=STEP_ATTEMPTS_MAX,
            budget_s=budget_s,
        )
    return str(row.r_status)


def _finish(
    conn: Connection,
    attempt: Attempt,
    outcome: str,
    error: str | None,
    phase: Phase,
    ctx: RunContext | None,
) -> str:
    row = lock_job(conn, attempt.job_id)
    if _result_recorded(conn, attempt, phase):
        return str(row.status)
    now = utcnow()
    current = row.lease_token == attempt.token and row.status == phase.running_status
    if current and ctx is not None:
        values: dict[str, Any] = {}
        if ctx.unrecorded:
            values["outputs"] = merged(row.outputs, ctx.unrecorded)
        if ctx.total:
            values["progress_step"], values["progress_total"] = ctx.step, ctx.total
        if values:
            row = conn.execute(
                update(jobs).where(jobs.c.id == row.id).values(**values).returning(*jobs.c)
            ).one()
    delivered = [o for o in row.outputs if o.get("delivered")]
    if current:
        ended = outcome
    else:
        ended = leases.LATE if states.is_terminal(row.status) else leases.SUPERSEDED
    leases.end_attempt(conn, row.id, phase.running_status, attempt.number, ended, now, error)
    conn.execute(
        insert(job_results).values(
            job_id=row.id,
            phase=phase.running_status,
            attempt=attempt.number,
            outcome=outcome,
            delivered=len(delivered) if current else 0,
            applied=current,
            detail=error if current else f"late: job {row.status}, attempt {row.attempt}",
            created_at=now,
        )
    )
    if not current:
        return str(row.status)
    status, reason, charged_outputs = outcome_of(
        outcome, error, row.outputs, row.outputs_expected, phase.outputs_required
    )
    return str(phase.settle(conn, row, status, charged_outputs, now, reason).status)


def _result_recorded(conn: Connection, attempt: Attempt, phase: Phase) -> bool:
    found = conn.execute(
        select(job_results.c.id).where(
            job_results.c.job_id == attempt.job_id,
            job_results.c.phase == phase.running_status,
            job_results.c.attempt == attempt.number,
        )
    ).first()
    return found is not None


def _undelivered_reason(outputs: list[dict[str, Any]]) -> str:
    reasons = sorted({o.get("reason") or "unknown" for o in outputs if not o.get("delivered")})
    return "; ".join(reasons) if reasons else "no outputs were produced"
