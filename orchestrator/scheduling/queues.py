"""What the scheduler shows: a queued job's place and ETA, the per-queue overview
(GET /v1/queue, `tollgate queue`, /metrics), and operators' per-account cap overrides."""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import Connection, Engine, case, func, select, update

from billing import ledger
from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.jobs.families import GPU_QUEUES
from orchestrator.scheduling import fairness, slots
from orchestrator.scheduling.flows import greatest, vtime_expr
from orchestrator.scheduling.scheduler import DISPATCHED, QUEUED, _as_flow, _insert_ignore, plan_cap
from orchestrator.settings import get_settings
from orchestrator.tables import account_limits, dispatch_queue, sched_flows

TOP_ACCOUNTS: Final = 10
# A position estimate reads at most this many other flows (those whose heads come first).
POSITION_FLOWS_MAX: Final = 2000
RUNNING_CAP_MAX: Final = 10_000


def position(conn: Connection, job_id: str) -> dict[str, Any] | None:
    """{queue, position, ahead_in_account} for a queued job, or None (not queued)."""
    entry = conn.execute(
        select(dispatch_queue).where(
            dispatch_queue.c.job_id == job_id, dispatch_queue.c.state == QUEUED
        )
    ).first()
    if entry is None:
        return None
    own_row = conn.execute(
        select(sched_flows).where(
            sched_flows.c.queue == entry.queue, sched_flows.c.account_id == entry.account_id
        )
    ).first()
    if own_row is None:
        return None
    own = _as_flow(own_row)
    ahead_own = conn.execute(
        select(func.count())
        .select_from(dispatch_queue)
        .where(
            dispatch_queue.c.queue == entry.queue,
            dispatch_queue.c.account_id == entry.account_id,
            dispatch_queue.c.state == QUEUED,
            dispatch_queue.c.id < entry.id,
        )
    ).scalar_one()
    aging = get_settings().sched_aging_per_s
    step = 1.0 / max(own.weight, fairness.MIN_WEIGHT)
    key = fairness.sort_key(own.head_tag + ahead_own * step, own.head_since_s, aging)
    others = [
        _as_flow(r)
        for r in conn.execute(
            select(sched_flows)
            .where(
                sched_flows.c.queue == entry.queue,
                sched_flows.c.queued > 0,
                sched_flows.c.sort_key <= key,
            )
            .order_by(sched_flows.c.sort_key)
            .limit(POSITION_FLOWS_MAX)
        )
    ]
    return {
        "queue": entry.queue,
        "task": entry.task,
        "position": fairness.jobs_ahead(ahead_own, own, others, aging),
    }


def queue_info(engine: Engine, redis: Any, job_id: str) -> dict[str, Any] | None:
    """`queue: {position, eta_s}` of a queued job: jobs that will run before it (from the
    fair order) and the seconds until it starts (its family's mean run time x (position +
    1) / live slots; null while no worker serves its queue)."""
    place = run_transaction(engine, lambda conn: position(conn, job_id))
    if place is None:
        return None
    eta_s: float | None = None
    try:
        live = slots.slots_per_queue(slots.live(redis)).get(place["queue"], 0)
        run_s = slots.mean_run_s(redis).get(place["task"])
        if live and run_s is not None:
            eta_s = round(run_s * (place["position"] + 1) / live, 1)
    except Exception:  # Redis away: the position still stands
        eta_s = None
    return {"position": place["position"], "eta_s": eta_s}


def overview(engine: Engine, redis: Any) -> dict[str, Any]:
    """Per queue: live slots and workers, running (dispatched) and queued jobs, and the
    accounts with the most queued jobs."""
    workers = slots.live(redis)
    live = slots.slots_per_queue(workers)

    def work(conn: Connection) -> dict[str, Any]:
        counts = {
            (q, s): n
            for q, s, n in conn.execute(
                select(dispatch_queue.c.queue, dispatch_queue.c.state, func.count()).group_by(
                    dispatch_queue.c.queue, dispatch_queue.c.state
                )
            )
        }
        names = sorted(set(GPU_QUEUES) | set(live) | {q for q, _ in counts})
        out = {}
        for name in names:
            top = conn.execute(
                select(
                    sched_flows.c.account_id,
                    sched_flows.c.plan,
                    sched_flows.c.queued,
                    sched_flows.c.running,
                    sched_flows.c.cap,
                )
                .where(sched_flows.c.queue == name, sched_flows.c.queued > 0)
                .order_by(sched_flows.c.queued.desc(), sched_flows.c.account_id)
                .limit(TOP_ACCOUNTS)
            ).all()
            out[name] = {
                "live_slots": live.get(name, 0),
                "workers": sorted(w.hostname for w in workers if name in w.queues),
                "running": counts.get((name, DISPATCHED), 0),
                "queued": counts.get((name, QUEUED), 0),
                "top_accounts": [r._asdict() for r in top],
            }
        return out

    return {"queues": run_transaction(engine, work)}


def set_running_cap(engine: Engine, account_id: str, running_cap: int | None) -> dict[str, Any]:
    """An operator's override of an account's running cap on every queue (None: back to
    its plan's). Takes effect at the next dispatch (the route nudges one at once)."""
    if running_cap is not None and not 0 <= running_cap <= RUNNING_CAP_MAX:
        from billing import InvalidJobSpec

        raise InvalidJobSpec("running_cap", f"must be in 0..{RUNNING_CAP_MAX} or null")

    def work(conn: Connection) -> dict[str, Any]:
        account = ledger.get_account(conn, account_id)
        now = utcnow()
        _insert_ignore(
            conn, account_limits, {"account_id": account_id, "running_cap": None, "updated_at": now}
        )
        conn.execute(
            update(account_limits)
            .where(account_limits.c.account_id == account_id)
            .values(running_cap=running_cap, updated_at=now)
        )
        cap = running_cap if running_cap is not None else plan_cap(get_settings(), account.plan)
        f = sched_flows.c
        eligible = (f.queued > 0) & (f.running < cap)
        entering = eligible & ~f.eligible  # a raised cap: enters at max(V, F), as of now
        head = greatest(vtime_expr(f.queue), f.finish_tag)
        now_s = now.timestamp()
        conn.execute(
            update(sched_flows)
            .where(f.account_id == account_id)
            .values(
                cap=cap,
                eligible=eligible,
                head_tag=case((entering, head), else_=f.head_tag),
                head_since_s=case((entering, now_s), else_=f.head_since_s),
                sort_key=case(
                    (entering, head + get_settings().sched_aging_per_s * now_s),
                    else_=f.sort_key,
                ),
            )
        )
        return {"account_id": account_id, "plan": account.plan, "running_cap": cap}

    return run_transaction(engine, work)
