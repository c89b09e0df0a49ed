"""One dispatch decision's reads, in the dispatcher's transaction: the pool's queue locks
and state, each queue's first eligible flows and their fair picks, how a pool's free
slots are shared between its queues, and the entries the picks take. Statements are built
once; their parameters are bound at each call."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Final

from sqlalchemy import Connection, bindparam, exists, func, select, text, update
from sqlalchemy.engine import Row

from orchestrator.scheduling import fairness
from orchestrator.scheduling.flows import DISPATCHED, QUEUED, _as_flow, _insert_ignore
from orchestrator.settings import get_settings
from orchestrator.tables import dispatch_queue, sched_flows, sched_queues


def _state_stmt() -> Any:
    in_flight = (
        select(func.count())
        .select_from(dispatch_queue)
        .where(dispatch_queue.c.queue == sched_queues.c.queue, dispatch_queue.c.state == DISPATCHED)
        .scalar_subquery()
    )
    work = exists().where(sched_flows.c.queue == sched_queues.c.queue, sched_flows.c.eligible)
    return (
        select(sched_queues.c.queue, sched_queues.c.vtime, in_flight.label("in_flight"))
        .add_columns(work.label("work"))
        .where(sched_queues.c.queue.in_(bindparam("b_queues", expanding=True)))
        .order_by(sched_queues.c.queue)
    )


# Built once (their parameters are bound at each call): a dispatch decision's statements.
LOCK_QUEUES: Final = (
    select(sched_queues.c.queue)
    .where(sched_queues.c.queue.in_(bindparam("b_queues", expanding=True)))
    .order_by(sched_queues.c.queue)
    .with_for_update()
)
# Read after the lock, in a statement of its own: under READ COMMITTED a statement sees the
# commits before it began, so counts read by the locking statement itself could predate
# the dispatcher it waited for.
QUEUE_STATE: Final = _state_stmt()
FIRST_FLOWS: Final = (
    select(sched_flows)
    .where(sched_flows.c.queue == bindparam("b_queue"), sched_flows.c.eligible.is_(True))
    .order_by(sched_flows.c.sort_key, sched_flows.c.head_since_s, sched_flows.c.account_id)
    .limit(bindparam("b_limit"))
    .with_for_update()
)
# SKIP LOCKED: an entry a cancel is deleting right now is not ours to dispatch.
HEADS: Final = (
    select(dispatch_queue)
    .where(
        dispatch_queue.c.queue == bindparam("b_queue"),
        dispatch_queue.c.account_id == bindparam("b_account"),
        dispatch_queue.c.state == QUEUED,
    )
    .order_by(dispatch_queue.c.id)
    .limit(bindparam("b_limit"))
    .with_for_update(skip_locked=True)
)


# The same two reads on PostgreSQL as fixed driver SQL (every pass runs them; nothing is
# rendered per call, and psycopg prepares them). The queues come as a joined array, not
# `= ANY(array)`, and the lock sets `plan_cache_mode` for the rest of the pass's
# transaction: otherwise PostgreSQL's plan cache keeps choosing custom plans for them (it
# prices the generic plan for a large array), i.e. plans them again at every pass
# (tests/test_dispatch_plans.py). The pass's statements are fixed and index-driven.
PG_LOCK_QUEUES_SQL: Final = (
    "SELECT q.queue, set_config('plan_cache_mode', 'force_generic_plan', true)"
    " FROM unnest(%(queues)s::text[]) AS u(queue)"
    " JOIN sched_queues AS q ON q.queue = u.queue ORDER BY q.queue FOR UPDATE OF q"
)
PG_QUEUE_STATE_SQL: Final = (
    "SELECT q.queue, q.vtime, (SELECT count(*) FROM dispatch_queue AS d"
    " WHERE d.queue = q.queue AND d.state = 'dispatched') AS in_flight,"
    " EXISTS (SELECT 1 FROM sched_flows AS f WHERE f.queue = q.queue AND f.eligible) AS work"
    " FROM unnest(%(queues)s::text[]) AS u(queue)"
    " JOIN sched_queues AS q ON q.queue = u.queue ORDER BY q.queue"
)
PG_FIRST_FLOWS_SQL: Final = (
    "SELECT * FROM sched_flows WHERE queue = %(queue)s AND eligible"
    " ORDER BY sort_key, head_since_s, account_id LIMIT %(limit)s FOR UPDATE"
)


def lock_queues(conn: Connection, queues: tuple[str, ...]) -> list[Row[Any]]:
    """Lock the pool's queue rows (sorted: no deadlock between dispatchers), then read each
    one's virtual time, jobs in flight and whether a flow is eligible."""
    if conn.dialect.name == "postgresql":
        pg = {"queues": list(queues)}
        locked = conn.exec_driver_sql(PG_LOCK_QUEUES_SQL, pg).scalars().all()
    else:
        params = {"b_queues": list(queues)}
        locked = conn.execute(LOCK_QUEUES, params).scalars().all()
    if len(locked) < len(queues):  # a queue's first dispatch: its row (V = 0)
        for q in set(queues) - set(locked):
            _insert_ignore(conn, sched_queues, {"queue": q, "vtime": 0.0})
        conn.execute(LOCK_QUEUES, {"b_queues": list(queues)})
    if conn.dialect.name == "postgresql":
        return list(conn.exec_driver_sql(PG_QUEUE_STATE_SQL, pg).all())
    return list(conn.execute(QUEUE_STATE, {"b_queues": list(queues)}).all())


@dataclass
class Plan:
    """One queue's picks: accounts in order, with the second each head has waited since."""

    queue: str
    vtime: float
    rows: dict[str, Row[Any]]
    order: list[str]
    since: list[float]


def plan_queue(conn: Connection, queue: str, vtime: float, free: int, now_s: float) -> Plan:
    if conn.dialect.name == "postgresql":
        params = {"queue": queue, "limit": free}
        rows = conn.exec_driver_sql(PG_FIRST_FLOWS_SQL, params).all()
    else:
        rows = conn.execute(FIRST_FLOWS, {"b_queue": queue, "b_limit": free}).all()
    aging = get_settings().sched_aging_per_s
    order = fairness.pick([_as_flow(r) for r in rows], free, vtime, now_s, aging).order
    by = {r.account_id: r for r in rows}
    seen: set[str] = set()
    since = []
    for account in order:  # a flow's next head became head when its previous one went
        since.append(now_s if account in seen else by[account].head_since_s)
        seen.add(account)
    return Plan(queue, vtime, by, order, since)


def share(plans: list[Plan], free: int) -> dict[str, int]:
    """How many of each queue's picks go now when the pool has `free` slots for all of
    them: the longest-waiting next head first, across queues."""
    taken_n = {p.queue: 0 for p in plans}
    for _ in range(free):
        ready = [p for p in plans if taken_n[p.queue] < len(p.order)]
        if not ready:
            break
        best = min(ready, key=lambda p: (p.since[taken_n[p.queue]], p.queue))
        taken_n[best.queue] += 1
    return taken_n


# Several accounts' oldest entries in one statement (PostgreSQL): a LATERAL read per account.
HEADS_MANY: Final = text(
    "SELECT d.* FROM unnest(CAST(:b_accounts AS text[]), CAST(:b_counts AS integer[]))"
    " AS w(account_id, n) CROSS JOIN LATERAL (SELECT * FROM dispatch_queue"
    " WHERE dispatch_queue.queue = :b_queue AND dispatch_queue.account_id = w.account_id"
    " AND dispatch_queue.state = 'queued' ORDER BY dispatch_queue.id LIMIT w.n"
    " FOR UPDATE SKIP LOCKED) AS d"
).columns(*dispatch_queue.c)


def _heads(conn: Connection, queue: str, wanted: Counter[str]) -> dict[str, list[Row[Any]]]:
    if len(wanted) > 1 and conn.dialect.name == "postgresql":
        accounts = list(wanted)
        params = {
            "b_queue": queue,
            "b_accounts": accounts,
            "b_counts": [wanted[a] for a in accounts],
        }
        found: dict[str, list[Row[Any]]] = {a: [] for a in accounts}
        for row in conn.execute(HEADS_MANY, params):
            found[row.account_id].append(row)
        return found
    return {
        account: list(
            conn.execute(HEADS, {"b_queue": queue, "b_account": account, "b_limit": count}).all()
        )
        for account, count in wanted.items()
    }


def apply_plan(conn: Connection, plan: Plan, n: int, now_s: float) -> tuple[list[Row[Any]], list]:
    """Take the plan's first `n` picks with the entries actually found (a counter that
    drifted is fixed); returns the entries and the flows' new rows for one batched write."""
    order = plan.order[:n]
    wanted = Counter(order)
    heads = _heads(conn, plan.queue, wanted)
    original = {a: _as_flow(plan.rows[a]) for a in wanted}
    state = dict(original)
    vtime = plan.vtime
    entries: list[Row[Any]] = []
    used: Counter[str] = Counter()
    for account in order:
        if used[account] >= len(heads[account]):
            continue
        entries.append(heads[account][used[account]])
        used[account] += 1
        state[account], vtime = fairness.dispatched(state[account], vtime, now_s)
    aging = get_settings().sched_aging_per_s
    writes = []
    for account, flow in state.items():
        if len(heads[account]) < wanted[account]:  # fewer entries than the counter said
            real = conn.execute(
                select(func.count())
                .select_from(dispatch_queue)
                .where(
                    dispatch_queue.c.queue == plan.queue,
                    dispatch_queue.c.account_id == account,
                    dispatch_queue.c.state == QUEUED,
                )
            ).scalar_one()
            flow = replace(flow, queued=real)
        if flow != original[account]:
            writes.append(
                {
                    "b_queue": plan.queue,
                    "b_account": account,
                    "b_running": max(0, flow.running),
                    "b_queued": max(0, flow.queued),
                    "b_finish": flow.finish_tag,
                    "b_head": flow.head_tag,
                    "b_since": flow.head_since_s,
                    "b_key": fairness.sort_key(flow.head_tag, flow.head_since_s, aging),
                    "b_eligible": flow.eligible,
                }
            )
    plan.vtime = vtime
    return entries, writes


FLOW_WRITE: Final = (
    update(sched_flows)
    .where(
        sched_flows.c.queue == bindparam("b_queue"),
        sched_flows.c.account_id == bindparam("b_account"),
    )
    .values(
        running=bindparam("b_running"),
        queued=bindparam("b_queued"),
        finish_tag=bindparam("b_finish"),
        head_tag=bindparam("b_head"),
        head_since_s=bindparam("b_since"),
        sort_key=bindparam("b_key"),
        eligible=bindparam("b_eligible"),
    )
)
