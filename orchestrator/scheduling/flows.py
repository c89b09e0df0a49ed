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

from functools import lru_cache
from typing import Any, Final

from sqlalchemy import (
    ColumnElement,
    Connection,
    Float,
    and_,
    bindparam,
    case,
    func,
    not_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row

from billing.tables import accounts
from orchestrator.scheduling import fairness
from orchestrator.settings import Settings, get_settings
from orchestrator.tables import account_limits, sched_flows, sched_queues

PLANS = ("free", "standard", "business")
QUEUED: Final = "queued"
DISPATCHED: Final = "dispatched"


def _insert_ignore(conn: Connection, table: Any, values: dict[str, Any]) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(table).values(**values).on_conflict_do_nothing())


def _as_flow(row: Row[Any]) -> fairness.Flow:
    return fairness.Flow(
        row.account_id,
        row.weight,
        row.cap,
        row.running,
        row.queued,
        row.finish_tag,
        row.head_tag,
        row.head_since_s,
    )


def plan_weight(settings: Settings, plan: str) -> float:
    return float(getattr(settings, f"plan_weight_{plan}", settings.plan_weight_free))


def plan_cap(settings: Settings, plan: str) -> int:
    return int(getattr(settings, f"plan_running_cap_{plan}", settings.plan_running_cap_free))


def greatest(a: Any, b: Any) -> ColumnElement[Any]:
    """max(a, b) on both dialects (no GREATEST on SQLite)."""
    return case((a >= b, a), else_=b)


def _limits_exprs() -> tuple[Any, Any, Any]:
    """(plan, weight, cap) of account `:b_account` as SQL subqueries (primary-key reads);
    the plans' weights and caps are parameters too (`settings_params`)."""
    account: Any = bindparam("b_account")
    plan = select(accounts.c.plan).where(accounts.c.id == account).scalar_subquery()
    weight = case(
        {p: bindparam(f"b_weight_{p}") for p in PLANS}, value=plan, else_=bindparam("b_weight_free")
    )
    plan_caps = case(
        {p: bindparam(f"b_cap_{p}") for p in PLANS}, value=plan, else_=bindparam("b_cap_free")
    )
    override = (
        select(account_limits.c.running_cap)
        .where(account_limits.c.account_id == account)
        .scalar_subquery()
    )
    return plan, weight, func.coalesce(override, plan_caps)


def settings_params(settings: Settings) -> dict[str, Any]:
    return {
        "b_aging": settings.sched_aging_per_s,
        **{f"b_weight_{p}": plan_weight(settings, p) for p in PLANS},
        **{f"b_cap_{p}": plan_cap(settings, p) for p in PLANS},
    }


def vtime_expr(queue: Any) -> ColumnElement[Any]:
    """The queue's virtual time (0 before its first dispatch); `queue` may be a column."""
    return func.coalesce(
        select(sched_queues.c.vtime).where(sched_queues.c.queue == queue).scalar_subquery(), 0.0
    )


def _changes(d_queued: int, d_running: int, *, refresh: bool = False) -> dict[str, Any]:
    """SET clauses for `queued += d_queued, running += d_running` (never below 0) of the
    flow (:b_queue, :b_account) at :b_now. With `refresh`, a new backlog period re-reads
    the plan and limits."""
    f = sched_flows.c
    now_s = bindparam("b_now", type_=Float)
    queued = greatest(f.queued + d_queued, 0) if d_queued < 0 else f.queued + d_queued
    running = greatest(f.running + d_running, 0) if d_running < 0 else f.running + d_running
    values: dict[str, Any] = {"queued": queued, "running": running}
    cap: Any = f.cap
    if refresh:
        plan, weight, fresh_cap = _limits_exprs()
        new_period = f.queued == 0
        cap = case((new_period, fresh_cap), else_=f.cap)
        values |= {
            "plan": case((new_period, plan), else_=f.plan),
            "weight": case((new_period, weight), else_=f.weight),
            "cap": cap,
        }
    eligible = and_(queued > 0, running < cap)
    entering = and_(eligible, not_(and_(f.queued > 0, f.running < f.cap)))
    head = greatest(vtime_expr(bindparam("b_queue")), f.finish_tag)
    return values | {
        "head_tag": case((entering, head), else_=f.head_tag),
        "head_since_s": case((entering, now_s), else_=f.head_since_s),
        "sort_key": case((entering, head + bindparam("b_aging") * now_s), else_=f.sort_key),
        "eligible": eligible,
    }


@lru_cache(maxsize=16)
def _change_stmt(d_queued: int, d_running: int) -> Any:
    return (
        update(sched_flows)
        .where(
            sched_flows.c.queue == bindparam("b_queue"),
            sched_flows.c.account_id == bindparam("b_account"),
        )
        .values(**_changes(d_queued, d_running))
    )


# PostgreSQL: `scheduler.release` as one statement. The job's line entry is deleted and its
# flow given back a slot (a dispatched entry, held = 1) or a place (a queued one, held = 0),
# with `_changes`' arithmetic; the SET expressions read the flow's own columns, so a
# concurrent writer's newer row version is what they change. Written out by hand: short
# enough for psycopg's query cache (4 kB), which the built form (7 kB) missed.
def _release_exprs(g: str) -> tuple[str, str, str, str, str]:
    """(new queued, new running, eligible, entering, head) of flow `f` released by the
    relation `g` (its `held` and `vtime`)."""
    new_queued = f"GREATEST(f.queued - 1 + {g}.held, 0)"
    new_running = f"GREATEST(f.running - {g}.held, 0)"
    eligible = f"({new_queued} > 0 AND {new_running} < f.cap)"
    entering = f"({eligible} AND NOT (f.queued > 0 AND f.running < f.cap))"
    return new_queued, new_running, eligible, entering, f"GREATEST({g}.vtime, f.finish_tag)"


_NEW_QUEUED, _NEW_RUNNING, _ELIGIBLE, _ENTERING, _HEAD = _release_exprs("g")
RELEASED_SQL: Final = f"""WITH gone AS (
 DELETE FROM dispatch_queue WHERE job_id = %(job)s
 RETURNING queue, account_id, CASE WHEN state = '{DISPATCHED}' THEN 1 ELSE 0 END AS held
), g AS (
 SELECT gone.*, COALESCE((SELECT q.vtime FROM sched_queues q WHERE q.queue = gone.queue), 0.0)
  AS vtime FROM gone
)
UPDATE sched_flows f SET
 queued = {_NEW_QUEUED},
 running = {_NEW_RUNNING},
 head_tag = CASE WHEN {_ENTERING} THEN {_HEAD} ELSE f.head_tag END,
 head_since_s = CASE WHEN {_ENTERING} THEN %(now)s ELSE f.head_since_s END,
 sort_key = CASE WHEN {_ENTERING} THEN {_HEAD} + %(aging)s * %(now)s ELSE f.sort_key END,
 eligible = {_ELIGIBLE}
FROM g WHERE f.queue = g.queue AND f.account_id = g.account_id"""


def release_ctes(guard: str) -> str:
    """The same release as CTEs (`rel_gone`, `rel_g`, `rel_flow`) to compose into another
    statement, run only where `guard` (an SQL condition) holds. Its parameters: %(job)s,
    %(release_now_s)s and %(release_aging)s (orchestrator.execution.result: `finish` and
    the release in one round trip)."""
    new_queued, new_running, eligible, entering, head = _release_exprs("rel_g")
    return f"""rel_gone AS (
 DELETE FROM dispatch_queue WHERE job_id = %(job)s AND ({guard})
 RETURNING queue, account_id, CASE WHEN state = '{DISPATCHED}' THEN 1 ELSE 0 END AS held
), rel_g AS (
 SELECT rel_gone.*, COALESCE((SELECT q.vtime FROM sched_queues q
  WHERE q.queue = rel_gone.queue), 0.0) AS vtime FROM rel_gone
), rel_flow AS (
 UPDATE sched_flows f SET
 queued = {new_queued},
 running = {new_running},
 head_tag = CASE WHEN {entering} THEN {head} ELSE f.head_tag END,
 head_since_s = CASE WHEN {entering} THEN %(release_now_s)s ELSE f.head_since_s END,
 sort_key = CASE WHEN {entering} THEN {head} + %(release_aging)s * %(release_now_s)s
  ELSE f.sort_key END,
 eligible = {eligible}
 FROM rel_g WHERE f.queue = rel_g.queue AND f.account_id = rel_g.account_id
)"""


def released(conn: Connection, job_id: str, now_s: float) -> None:
    """PostgreSQL only: `scheduler.release` in one round trip (`RELEASED_SQL`)."""
    params = {"job": job_id, "now": float(now_s), "aging": float(get_settings().sched_aging_per_s)}
    conn.exec_driver_sql(RELEASED_SQL, params)


@lru_cache(maxsize=8)
def _joined_stmt(dialect_name: str, d_running: int) -> Any:
    plan, weight, cap = _limits_exprs()
    now_s = bindparam("b_now", type_=Float)
    head = vtime_expr(bindparam("b_queue"))
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    stmt = dialect.insert(sched_flows).values(
        queue=bindparam("b_queue"),
        account_id=bindparam("b_account"),
        plan=plan,
        weight=weight,
        cap=cap,
        running=0,
        queued=1,
        finish_tag=0.0,
        head_tag=head,
        head_since_s=now_s,
        sort_key=head + bindparam("b_aging") * now_s,
        eligible=cap > 0,
    )
    return stmt.on_conflict_do_update(
        index_elements=[sched_flows.c.queue, sched_flows.c.account_id],
        set_=_changes(1, d_running, refresh=True),
    )


def change(
    conn: Connection, queue: str, account_id: str, d_queued: int, d_running: int, now_s: float
) -> None:
    """A job of an existing flow changed state (left the line, freed or took a slot)."""
    params = {"b_queue": queue, "b_account": account_id, "b_now": now_s}
    params["b_aging"] = get_settings().sched_aging_per_s
    conn.execute(_change_stmt(d_queued, d_running), params)


def joined(conn: Connection, queue: str, account_id: str, now_s: float, d_running: int = 0) -> None:
    """A job joined the line (`d_running` -1: it came back from a lost slot): one upsert; the
    account's first job on the queue creates its flow at the queue's virtual time."""
    params = {"b_queue": queue, "b_account": account_id, "b_now": now_s}
    conn.execute(
        _joined_stmt(conn.dialect.name, d_running), params | settings_params(get_settings())
    )
