"""A flow's counters in SQL: one statement per change, in the caller's transaction.

A job joining the line, leaving it, or freeing a slot changes its flow (queue, account) by
`queued += dq, running += dr`. `change` writes that as ONE `UPDATE` (or, for a job that may
be its account's first on the queue, one upsert) whose `CASE`s do what
orchestrator.scheduling.fairness does in Python: a flow that becomes eligible (queued > 0
and running < cap) enters at `max(V, F)` as of now (V read by a primary-key subquery only in
that branch); a new backlog period (queued was 0) takes the plan's weight and the cap (an
operator's override first) as they are now. The row lock the statement takes serialises it
with a dispatcher that holds the flow.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, case, func, not_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from billing.tables import accounts
from orchestrator.settings import Settings, get_settings
from orchestrator.tables import account_limits, sched_flows, sched_queues

PLANS = ("free", "standard", "business")


def plan_weight(settings: Settings, plan: str) -> float:
    return float(getattr(settings, f"plan_weight_{plan}", settings.plan_weight_free))


def plan_cap(settings: Settings, plan: str) -> int:
    return int(getattr(settings, f"plan_running_cap_{plan}", settings.plan_running_cap_free))


def greatest(a: Any, b: Any) -> ColumnElement[Any]:
    """max(a, b) on both dialects (no GREATEST on SQLite)."""
    return case((a >= b, a), else_=b)


def _limits_exprs(account_id: str, settings: Settings) -> tuple[Any, Any, Any]:
    """(plan, weight, cap) of the account as SQL subqueries (primary-key reads)."""
    plan = select(accounts.c.plan).where(accounts.c.id == account_id).scalar_subquery()
    weight = case(
        {p: plan_weight(settings, p) for p in PLANS}, value=plan, else_=settings.plan_weight_free
    )
    plan_caps = case(
        {p: plan_cap(settings, p) for p in PLANS}, value=plan, else_=settings.plan_running_cap_free
    )
    override = (
        select(account_limits.c.running_cap)
        .where(account_limits.c.account_id == account_id)
        .scalar_subquery()
    )
    return plan, weight, func.coalesce(override, plan_caps)


def vtime_expr(queue: Any) -> ColumnElement[Any]:
    """The queue's virtual time (0 before its first dispatch); `queue` may be a column."""
    return func.coalesce(
        select(sched_queues.c.vtime).where(sched_queues.c.queue == queue).scalar_subquery(), 0.0
    )


def _changes(
    queue: str, d_queued: int, d_running: int, now_s: float, *, refresh: str | None = None
) -> dict[str, Any]:
    """SET clauses for `queued += d_queued, running += d_running` (never below 0). With
    `refresh` (the account id), a new backlog period re-reads the plan and limits."""
    settings = get_settings()
    f = sched_flows.c
    queued = greatest(f.queued + d_queued, 0) if d_queued < 0 else f.queued + d_queued
    running = greatest(f.running + d_running, 0) if d_running < 0 else f.running + d_running
    values: dict[str, Any] = {"queued": queued, "running": running}
    cap: Any = f.cap
    if refresh is not None:
        plan, weight, fresh_cap = _limits_exprs(refresh, settings)
        new_period = f.queued == 0
        cap = case((new_period, fresh_cap), else_=f.cap)
        values |= {
            "plan": case((new_period, plan), else_=f.plan),
            "weight": case((new_period, weight), else_=f.weight),
            "cap": cap,
        }
    eligible = and_(queued > 0, running < cap)
    entering = and_(eligible, not_(and_(f.queued > 0, f.running < f.cap)))
    head = greatest(vtime_expr(queue), f.finish_tag)
    return values | {
        "head_tag": case((entering, head), else_=f.head_tag),
        "head_since_s": case((entering, now_s), else_=f.head_since_s),
        "sort_key": case((entering, head + settings.sched_aging_per_s * now_s), else_=f.sort_key),
        "eligible": eligible,
    }


def change(
    conn: Connection, queue: str, account_id: str, d_queued: int, d_running: int, now_s: float
) -> None:
    """A job of an existing flow changed state (left the line, freed or took a slot)."""
    conn.execute(
        update(sched_flows)
        .where(sched_flows.c.queue == queue, sched_flows.c.account_id == account_id)
        .values(**_changes(queue, d_queued, d_running, now_s))
    )


def joined(conn: Connection, queue: str, account_id: str, now_s: float, d_running: int = 0) -> None:
    """A job joined the line (`d_running` -1: it came back from a lost slot): one upsert; the
    account's first job on the queue creates its flow at the queue's virtual time."""
    settings = get_settings()
    plan, weight, cap = _limits_exprs(account_id, settings)
    head = vtime_expr(queue)
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(sched_flows).values(
        queue=queue,
        account_id=account_id,
        plan=plan,
        weight=weight,
        cap=cap,
        running=0,
        queued=1,
        finish_tag=0.0,
        head_tag=head,
        head_since_s=now_s,
        sort_key=head + settings.sched_aging_per_s * now_s,
        eligible=cap > 0,
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[sched_flows.c.queue, sched_flows.c.account_id],
            set_=_changes(queue, 1, d_running, now_s, refresh=account_id),
        )
    )
