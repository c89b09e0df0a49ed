"""Admission by capacity, in fair order (the order itself: orchestrator.scheduling.fairness).

- `enqueue(conn, ...)`: in the caller's transaction (submit, a tune's next phase, a
  requeue), a job phase joins `dispatch_queue` as `queued`; its account's flow is updated.
- `release(conn, job_id)`: in the transaction that ends the phase (any settle, cancel,
  expiry), the entry is deleted and its slot (or its place in line) given back.
- `dispatch_once(engine, redis)`: per queue with live workers, ONE transaction under the
  queue's row lock (PostgreSQL; SQLite's BEGIN IMMEDIATE serialises it anyway): free =
  live slots + buffer - dispatched; the first `free` eligible flows by key are read
  (O(picks) rows of an index, whatever the backlog), the fair picks are marked
  `dispatched` and their Celery tasks written to the outbox. A crash before commit changes
  nothing; after it, the outbox publishes (at least once). Run after a submit, when a job
  ends (`nudge`) and every `dispatch_interval_s` from beat, so nothing depends on a nudge.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache, partial
from typing import Any, Final

from sqlalchemy import Connection, Engine, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row

from billing.clock import utcnow
from billing.db import run_transaction
from billing.tables import accounts
from orchestrator.jobs.families import FAMILIES, family_for
from orchestrator.scheduling import fairness, slots
from orchestrator.settings import Settings, get_settings
from orchestrator.tables import (
    account_limits,
    dispatch_queue,
    jobs,
    outbox,
    sched_flows,
    sched_queues,
)

log = logging.getLogger(__name__)

FAMILY_QUEUES: Final = frozenset(f.queue for f in FAMILIES.values())
QUEUED: Final = "queued"
DISPATCHED: Final = "dispatched"


def plan_weight(settings: Settings, plan: str) -> float:
    return float(getattr(settings, f"plan_weight_{plan}", settings.plan_weight_free))


def plan_cap(settings: Settings, plan: str) -> int:
    return int(getattr(settings, f"plan_running_cap_{plan}", settings.plan_running_cap_free))


def _insert_ignore(conn: Connection, table: Any, values: dict[str, Any]) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(table).values(**values).on_conflict_do_nothing())


def _vtime(conn: Connection, queue: str, *, lock: bool = False) -> float:
    stmt = select(sched_queues.c.vtime).where(sched_queues.c.queue == queue)
    value = conn.execute(stmt.with_for_update() if lock else stmt).scalar()
    if value is None:
        _insert_ignore(conn, sched_queues, {"queue": queue, "vtime": 0.0})
        value = conn.execute(stmt.with_for_update() if lock else stmt).scalar_one()
    return float(value)


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


def _limits(conn: Connection, account_id: str, settings: Settings) -> tuple[str, float, int]:
    row = conn.execute(
        select(accounts.c.plan, account_limits.c.running_cap)
        .select_from(accounts.outerjoin(account_limits))
        .where(accounts.c.id == account_id)
    ).one()
    cap = row.running_cap if row.running_cap is not None else plan_cap(settings, row.plan)
    return row.plan, plan_weight(settings, row.plan), cap


def _lock_flow(conn: Connection, queue: str, account_id: str) -> Row[Any]:
    stmt = (
        select(sched_flows)
        .where(sched_flows.c.queue == queue, sched_flows.c.account_id == account_id)
        .with_for_update()
    )
    row = conn.execute(stmt).first()
    if row is None:
        plan, weight, cap = _limits(conn, account_id, get_settings())
        _insert_ignore(
            conn,
            sched_flows,
            {
                "queue": queue,
                "account_id": account_id,
                "plan": plan,
                "weight": weight,
                "cap": cap,
                "running": 0,
                "queued": 0,
                "finish_tag": 0.0,
                "head_tag": 0.0,
                "head_since_s": 0.0,
                "sort_key": 0.0,
                "eligible": False,
            },
        )
        row = conn.execute(stmt).one()
    return row


def _store_flow(
    conn: Connection,
    queue: str,
    before: fairness.Flow,
    after: fairness.Flow,
    vtime: float | None,
    now_s: float,
    **values: Any,
) -> None:
    """Write a flow whose counts changed; a flow that becomes eligible enters at max(V, F)."""
    if after.eligible and not before.eligible:
        if vtime is None:  # read only when needed (most writes keep the head as it is)
            vtime = _vtime(conn, queue)
        after = fairness.entering(after, vtime, now_s)
    aging = get_settings().sched_aging_per_s
    conn.execute(
        update(sched_flows)
        .where(sched_flows.c.queue == queue, sched_flows.c.account_id == after.account_id)
        .values(
            running=max(0, after.running),
            queued=max(0, after.queued),
            finish_tag=after.finish_tag,
            head_tag=after.head_tag,
            head_since_s=after.head_since_s,
            sort_key=fairness.sort_key(after.head_tag, after.head_since_s, aging),
            eligible=after.eligible,
            **values,
        )
    )


def enqueue(
    conn: Connection, job_id: str, task: str, account_id: str, now: datetime, *, new: bool = False
) -> None:
    """The job's next phase (run by family `task`) waits for a slot. Idempotent; a
    `dispatched` entry (its worker was lost) goes back to `queued` at its old place.
    `new`: the job was inserted in this transaction (no entry can exist yet)."""
    queue = family_for(task).queue
    entry = (
        None
        if new
        else conn.execute(
            select(dispatch_queue.c.state, dispatch_queue.c.task).where(
                dispatch_queue.c.job_id == job_id
            )
        ).first()
    )
    if entry is not None and entry.state == QUEUED and entry.task == task:
        return
    now_s = now.timestamp()
    if entry is not None and entry.task != task:
        release(conn, job_id, now)
        entry = None
    row = _lock_flow(conn, queue, account_id)
    before = _as_flow(row)
    extra: dict[str, Any] = {}
    if entry is None:
        conn.execute(
            insert(dispatch_queue).values(
                job_id=job_id,
                task=task,
                queue=queue,
                account_id=account_id,
                state=QUEUED,
                enqueued_at=now,
            )
        )
        after = replace(before, queued=before.queued + 1)
        if before.queued == 0:  # a new backlog period: the plan and limits as they are now
            plan, weight, cap = _limits(conn, account_id, get_settings())
            after = replace(after, weight=weight, cap=cap)
            extra = {"plan": plan, "weight": weight, "cap": cap}
    else:
        conn.execute(
            update(dispatch_queue)
            .where(dispatch_queue.c.job_id == job_id)
            .values(state=QUEUED, dispatched_at=None)
        )
        after = replace(before, queued=before.queued + 1, running=before.running - 1)
    _store_flow(conn, queue, before, after, None, now_s, **extra)


def release(conn: Connection, job_id: str, now: datetime | None = None) -> None:
    """The job's phase ended (or it left the line): give back its slot or its place."""
    gone = conn.execute(
        delete(dispatch_queue)
        .where(dispatch_queue.c.job_id == job_id)
        .returning(dispatch_queue.c.queue, dispatch_queue.c.account_id, dispatch_queue.c.state)
    ).first()
    if gone is None:
        return
    before = _as_flow(_lock_flow(conn, gone.queue, gone.account_id))
    if gone.state == DISPATCHED:
        after = replace(before, running=before.running - 1)
    else:
        after = replace(before, queued=before.queued - 1)
    _store_flow(conn, gone.queue, before, after, None, (now or utcnow()).timestamp())


def taken(conn: Connection, job_id: str, now: datetime) -> None:
    """A worker started a job whose entry is still `queued` (its task was sent some other
    way): it holds a slot now, and the dispatcher must not send it again."""
    entry = conn.execute(
        update(dispatch_queue)
        .where(dispatch_queue.c.job_id == job_id, dispatch_queue.c.state == QUEUED)
        .values(state=DISPATCHED, dispatched_at=now)
        .returning(dispatch_queue.c.queue, dispatch_queue.c.account_id)
    ).first()
    if entry is None:
        return
    before = _as_flow(_lock_flow(conn, entry.queue, entry.account_id))
    after = replace(before, queued=before.queued - 1, running=before.running + 1)
    _store_flow(conn, entry.queue, before, after, None, now.timestamp())


@dataclass(frozen=True)
class Dispatched:
    job_ids: list[str]
    waits: list[tuple[str, float]]  # (plan, seconds queued) per job


def _dispatch_queue(conn: Connection, queue: str, capacity: int, limit: int) -> Dispatched:
    settings = get_settings()
    vtime = _vtime(conn, queue, lock=True)  # the queue's lock: one dispatcher at a time
    in_flight = conn.execute(
        select(func.count())
        .select_from(dispatch_queue)
        .where(dispatch_queue.c.queue == queue, dispatch_queue.c.state == DISPATCHED)
    ).scalar_one()
    free = min(limit, capacity - in_flight)
    if free <= 0:
        return Dispatched([], [])
    rows = conn.execute(
        select(sched_flows)
        .where(sched_flows.c.queue == queue, sched_flows.c.eligible.is_(True))
        .order_by(sched_flows.c.sort_key, sched_flows.c.head_since_s, sched_flows.c.account_id)
        .limit(free)
        .with_for_update()
    ).all()
    if not rows:
        return Dispatched([], [])
    now = utcnow()
    now_s = now.timestamp()
    aging = settings.sched_aging_per_s
    plans = {r.account_id: r.plan for r in rows}
    original = {r.account_id: _as_flow(r) for r in rows}
    order = fairness.pick(list(original.values()), free, vtime, now_s, aging).order
    wanted = Counter(order)
    heads: dict[str, list[Row[Any]]] = {}
    for account, count in wanted.items():
        # SKIP LOCKED: an entry a cancel is deleting right now is not ours to dispatch.
        heads[account] = list(
            conn.execute(
                select(dispatch_queue)
                .where(
                    dispatch_queue.c.queue == queue,
                    dispatch_queue.c.account_id == account,
                    dispatch_queue.c.state == QUEUED,
                )
                .order_by(dispatch_queue.c.id)
                .limit(count)
                .with_for_update(skip_locked=True)
            ).all()
        )
    # Replay the picks with the entries actually found (a counter that drifted is fixed).
    flows = dict(original)
    taken: list[Row[Any]] = []
    used: Counter[str] = Counter()
    for account in order:
        if used[account] >= len(heads[account]):
            continue
        taken.append(heads[account][used[account]])
        used[account] += 1
        flows[account], vtime = fairness.dispatched(flows[account], vtime, now_s)
    for account, flow in flows.items():
        if len(heads.get(account, [])) < wanted.get(account, 0):
            real = conn.execute(
                select(func.count())
                .select_from(dispatch_queue)
                .where(
                    dispatch_queue.c.queue == queue,
                    dispatch_queue.c.account_id == account,
                    dispatch_queue.c.state == QUEUED,
                )
            ).scalar_one()
            flow = replace(flow, queued=real)
        if flow != original[account]:
            _store_flow(conn, queue, original[account], flow, vtime, now_s)
    if not taken:
        return Dispatched([], [])
    ids = [t.job_id for t in taken]
    conn.execute(
        update(dispatch_queue)
        .where(dispatch_queue.c.id.in_([t.id for t in taken]))
        .values(state=DISPATCHED, dispatched_at=now)
    )
    conn.execute(
        update(jobs)
        .where(jobs.c.id.in_(ids), jobs.c.status == QUEUED)
        .values(status=DISPATCHED, updated_at=now)
    )
    conn.execute(
        insert(outbox),
        [
            {
                "topic": "dispatch",
                "job_id": t.job_id,
                "payload": {"job_id": t.job_id, "type": t.task},
                "created_at": now,
            }
            for t in taken
        ],
    )
    conn.execute(update(sched_queues).where(sched_queues.c.queue == queue).values(vtime=vtime))
    waits = [(plans[t.account_id], (now - t.enqueued_at).total_seconds()) for t in taken]
    return Dispatched(ids, waits)


def _with_work(engine: Engine, queues: list[str]) -> list[str]:
    """The queues among `queues` with an eligible flow (one index read, no locks): a
    nudge after each job then costs one statement for every queue with nothing to do."""
    if not queues:
        return []

    def work(conn: Connection) -> list[str]:
        return [
            q
            for q in queues
            if conn.execute(
                select(sched_flows.c.queue)
                .where(sched_flows.c.queue == q, sched_flows.c.eligible.is_(True))
                .limit(1)
            ).first()
            is not None
        ]

    return run_transaction(engine, work)


def dispatch_once(engine: Engine, redis: Any, limit: int | None = None) -> list[str]:
    """Dispatch what the live slots allow, in fair order, one transaction per queue.
    Returns the job ids dispatched (their tasks are in the outbox)."""
    settings = get_settings()
    limit = limit or settings.dispatch_batch_max
    live = slots.slots_per_queue(slots.live(redis), settings.sched_slot_buffer_per_worker)
    capacity = {q: n for q, n in live.items() if q in FAMILY_QUEUES}  # not callbacks etc.
    out: list[str] = []
    waits: list[tuple[str, float]] = []
    for queue in _with_work(engine, sorted(capacity)):
        done = run_transaction(
            engine, partial(_dispatch_queue, queue=queue, capacity=capacity[queue], limit=limit)
        )
        out += done.job_ids
        waits += done.waits
    if waits:
        try:
            slots.record_waits(redis, waits)
        except Exception:  # a metric only
            log.warning("queue wait histogram not recorded", exc_info=True)
    return out


@lru_cache(maxsize=4)
def _redis_for(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, decode_responses=True)


Publish = Callable[[str, dict[str, Any]], None]


def nudge(engine: Engine, publish: Publish, job_ids: str | Iterable[str] = ()) -> list[str]:
    """The fast path after a commit (a submit, a job's end): dispatch what the slots allow
    and publish the outbox rows of `job_ids` and of what was dispatched. Failures are left
    to beat (the periodic dispatcher and the re-publisher)."""
    from orchestrator.scheduling.outbox import relay_quietly

    dispatched: list[str] = []
    started = time.monotonic()
    try:
        redis = getattr(publish, "redis", None) or _redis_for(get_settings().redis_url)
        dispatched = dispatch_once(engine, redis)
    except Exception:
        log.warning("dispatch fast path failed; the periodic dispatcher will retry", exc_info=True)
    given = {job_ids} if isinstance(job_ids, str) else set(job_ids)
    ids = sorted(given | set(dispatched))
    if ids:
        relay_quietly(engine, publish, ids)
    log.debug(
        "nudge: %d dispatched in %.1f ms", len(dispatched), 1e3 * (time.monotonic() - started)
    )
    return dispatched
