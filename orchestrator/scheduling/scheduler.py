"""Admission by capacity, in fair order (the order itself: orchestrator.scheduling.fairness;
a flow's counters in SQL: orchestrator.scheduling.flows).

- `enqueue(conn, ...)`: in the caller's transaction (submit, a tune's next phase, a
  requeue), a job phase joins `dispatch_queue` as `queued`: two statements (the entry, and
  one upsert of its account's flow).
- `release(conn, job_id)`: in the transaction that ends the phase (any settle, cancel,
  expiry), the entry is deleted and its slot (or its place in line) given back: two
  statements.
- `dispatch_once(engine, redis)`: per pool of queues that share live workers
  (slots.pools: a worker's concurrency counts once), ONE transaction under the pool's
  queue-row locks (PostgreSQL; SQLite's BEGIN IMMEDIATE serialises it anyway), which also
  reads the jobs in flight and whether any flow is eligible: free = capacity - in flight;
  the first `free` eligible flows by key are read (O(picks) rows of an index, whatever
  the backlog), the fair picks are marked `dispatched` and their Celery tasks written to
  the outbox, all in a few batched statements. A crash before commit changes nothing;
  after it, the outbox publishes (at least once). Given `publish` (the nudge), the tasks
  are sent just before COMMIT and their outbox rows written as published: no relay
  transaction; a COMMIT that then fails leaves a task whose job is still `queued`, which
  the worker takes as sent around the scheduler (`taken`). Run after a submit, when a job
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

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    delete,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.db import commit_without_flush_wait
from orchestrator.jobs.families import FAMILIES, family_for
from orchestrator.scheduling import fairness, flows, slots
from orchestrator.scheduling.flows import plan_cap, plan_weight
from orchestrator.settings import get_settings
from orchestrator.tables import dispatch_queue, jobs, outbox, sched_flows, sched_queues

log = logging.getLogger(__name__)

FAMILY_QUEUES: Final = frozenset(f.queue for f in FAMILIES.values())
QUEUED: Final = "queued"
DISPATCHED: Final = "dispatched"
__all__ = ["plan_cap", "plan_weight", "enqueue", "release", "taken", "dispatch_once", "nudge"]

Publish = Callable[[str, dict[str, Any]], None]


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
    if entry is not None and entry.task != task:
        release(conn, job_id, now)
        entry = None
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
        flows.joined(conn, queue, account_id, now.timestamp())
    else:
        conn.execute(
            update(dispatch_queue)
            .where(dispatch_queue.c.job_id == job_id)
            .values(state=QUEUED, dispatched_at=None)
        )
        flows.joined(conn, queue, account_id, now.timestamp(), d_running=-1)


def release(conn: Connection, job_id: str, now: datetime | None = None) -> None:
    """The job's phase ended (or it left the line): give back its slot or its place."""
    gone = conn.execute(
        delete(dispatch_queue)
        .where(dispatch_queue.c.job_id == job_id)
        .returning(dispatch_queue.c.queue, dispatch_queue.c.account_id, dispatch_queue.c.state)
    ).first()
    if gone is None:
        return
    now_s = (now or utcnow()).timestamp()
    if gone.state == DISPATCHED:
        flows.change(conn, gone.queue, gone.account_id, 0, -1, now_s)
    else:
        flows.change(conn, gone.queue, gone.account_id, -1, 0, now_s)


def taken(conn: Connection, job_id: str, now: datetime) -> None:
    """A worker started a job whose entry is still `queued` (its task was sent some other
    way): it holds a slot now, and the dispatcher must not send it again."""
    entry = conn.execute(
        update(dispatch_queue)
        .where(dispatch_queue.c.job_id == job_id, dispatch_queue.c.state == QUEUED)
        .values(state=DISPATCHED, dispatched_at=now)
        .returning(dispatch_queue.c.queue, dispatch_queue.c.account_id)
    ).first()
    if entry is not None:
        flows.change(conn, entry.queue, entry.account_id, -1, 1, now.timestamp())


@dataclass(frozen=True)
class Dispatched:
    job_ids: list[str]
    waits: list[tuple[str, float]]  # (plan, seconds queued) per job


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


def _lock_queues(conn: Connection, queues: tuple[str, ...]) -> list[Row[Any]]:
    """Lock the pool's queue rows (sorted: no deadlock between dispatchers), then read each
    one's virtual time, jobs in flight and whether a flow is eligible."""
    params = {"b_queues": list(queues)}
    locked = conn.execute(LOCK_QUEUES, params).scalars().all()
    if len(locked) < len(queues):  # a queue's first dispatch: its row (V = 0)
        for q in set(queues) - set(locked):
            _insert_ignore(conn, sched_queues, {"queue": q, "vtime": 0.0})
        conn.execute(LOCK_QUEUES, params)
    return conn.execute(QUEUE_STATE, params).all()


@dataclass
class _Plan:
    """One queue's picks: accounts in order, with the second each head has waited since."""

    queue: str
    vtime: float
    rows: dict[str, Row[Any]]
    order: list[str]
    since: list[float]


def _plan_queue(conn: Connection, queue: str, vtime: float, free: int, now_s: float) -> _Plan:
    rows = conn.execute(FIRST_FLOWS, {"b_queue": queue, "b_limit": free}).all()
    aging = get_settings().sched_aging_per_s
    order = fairness.pick([_as_flow(r) for r in rows], free, vtime, now_s, aging).order
    by = {r.account_id: r for r in rows}
    seen: set[str] = set()
    since = []
    for account in order:  # a flow's next head became head when its previous one went
        since.append(now_s if account in seen else by[account].head_since_s)
        seen.add(account)
    return _Plan(queue, vtime, by, order, since)


def _share(plans: list[_Plan], free: int) -> dict[str, int]:
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


def _heads(conn: Connection, queue: str, wanted: Counter[str]) -> dict[str, list[Row[Any]]]:
    return {
        account: list(
            conn.execute(HEADS, {"b_queue": queue, "b_account": account, "b_limit": count}).all()
        )
        for account, count in wanted.items()
    }


def _apply(conn: Connection, plan: _Plan, n: int, now_s: float) -> tuple[list[Row[Any]], list]:
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


def _dispatch_pool(
    conn: Connection,
    pool: slots.Pool,
    limit: int,
    publish: Publish | None = None,
    sent: set[str] | None = None,
) -> Dispatched:
    """One pool's dispatch decision and its writes, in the caller's transaction."""
    locked = _lock_queues(conn, pool.queues)
    free = min(limit, pool.capacity - sum(r.in_flight for r in locked))
    if free <= 0 or not any(r.work for r in locked):
        return Dispatched([], [])
    now = utcnow()
    now_s = now.timestamp()
    plans = []
    for r in locked:
        room = min(free, pool.slots.get(r.queue, 0) - r.in_flight)
        if r.work and room > 0:
            plans.append(_plan_queue(conn, r.queue, float(r.vtime), room, now_s))
    share = _share(plans, free) if len(plans) > 1 else {p.queue: free for p in plans}
    taken_rows: list[Row[Any]] = []
    flow_writes: list[dict[str, Any]] = []
    vtimes = []
    plan_of: dict[tuple[str, str], str] = {}
    for plan in plans:
        if share.get(plan.queue, 0) <= 0:
            continue
        before = plan.vtime
        entries, writes = _apply(conn, plan, share[plan.queue], now_s)
        taken_rows += entries
        flow_writes += writes
        plan_of |= {(plan.queue, a): r.plan for a, r in plan.rows.items()}
        if plan.vtime != before:
            vtimes.append({"b_queue": plan.queue, "b_vtime": plan.vtime})
    if not taken_rows:
        if flow_writes:
            conn.execute(FLOW_WRITE, flow_writes)
        return Dispatched([], [])
    ids = [t.job_id for t in taken_rows]
    messages = [
        {
            "topic": "dispatch",
            "job_id": t.job_id,
            "payload": {"job_id": t.job_id, "type": t.task},
            "created_at": now,
            "published_at": None if publish is None else now,  # un-marked below if unsent
        }
        for t in taken_rows
    ]
    writes = [
        update(sched_flows)
        .where(sched_flows.c.queue == w["b_queue"], sched_flows.c.account_id == w["b_account"])
        .values(
            running=w["b_running"],
            queued=w["b_queued"],
            finish_tag=w["b_finish"],
            head_tag=w["b_head"],
            head_since_s=w["b_since"],
            sort_key=w["b_key"],
            eligible=w["b_eligible"],
        )
        for w in flow_writes
    ] + [
        update(sched_queues).where(sched_queues.c.queue == v["b_queue"]).values(vtime=v["b_vtime"])
        for v in vtimes
    ]
    writes += [
        update(dispatch_queue)
        .where(dispatch_queue.c.id.in_([t.id for t in taken_rows]))
        .values(state=DISPATCHED, dispatched_at=now),
        update(jobs)
        .where(jobs.c.id.in_(ids), jobs.c.status == QUEUED)
        .values(status=DISPATCHED, updated_at=now),
    ]
    if conn.dialect.name == "postgresql":  # every write in one statement (data-modifying CTEs)
        conn.execute(
            insert(outbox).values(messages).add_cte(*(w.cte(f"w{i}") for i, w in enumerate(writes)))
        )
    else:
        for w in writes:
            conn.execute(w)
        conn.execute(insert(outbox), messages)
    if publish is not None:
        # Sent last, with every row of theirs locked and written: a worker that gets a task
        # before COMMIT waits on its job's row, then finds it `dispatched`.
        published = _publish(publish, taken_rows, sent)
        unsent = [t.job_id for t in taken_rows if t.job_id not in published]
        if unsent:  # for the re-publisher
            conn.execute(
                update(outbox)
                .where(
                    outbox.c.topic == "dispatch",
                    outbox.c.job_id.in_(unsent),
                    outbox.c.published_at == now,
                )
                .values(published_at=None)
            )
        commit_without_flush_wait(conn)  # what it wrote is safe to lose (see the docstring)
    waits = [
        (plan_of[(t.queue, t.account_id)], (now - t.enqueued_at).total_seconds())
        for t in taken_rows
    ]
    return Dispatched(ids, waits)


def _publish(publish: Publish, entries: list[Row[Any]], sent: set[str] | None) -> set[str]:
    """Send the tasks (before COMMIT); a failure leaves the rest to the re-publisher.
    `sent` remembers what an earlier attempt of the same transaction already sent."""
    done: set[str] = set()
    for t in entries:
        if sent is not None and t.job_id in sent:
            done.add(t.job_id)
            continue
        try:
            publish("dispatch", {"job_id": t.job_id, "type": t.task})
        except Exception:
            log.warning("dispatch publish failed; the re-publisher will send it", exc_info=True)
            break
        done.add(t.job_id)
        if sent is not None:
            sent.add(t.job_id)
    return done


def _dispatch_queue(
    conn: Connection, queue: str, capacity: int, limit: int, publish: Publish | None = None
) -> Dispatched:
    """One queue served alone by `capacity` slots (benchmarks, tests)."""
    return _dispatch_pool(conn, slots.Pool((queue,), {queue: capacity}, capacity), limit, publish)


def dispatch_once(
    engine: Engine, redis: Any, limit: int | None = None, publish: Publish | None = None
) -> list[str]:
    """Dispatch what the live slots allow, in fair order, one transaction per pool of
    queues. Returns the job ids dispatched (their tasks are in the outbox; sent and marked
    published already when `publish` is given)."""
    settings = get_settings()
    limit = limit or settings.dispatch_batch_max
    pools = slots.pools(slots.live(redis), settings.sched_slot_buffer_per_worker, FAMILY_QUEUES)
    out: list[str] = []
    waits: list[tuple[str, float]] = []
    for pool in pools:
        sent: set[str] = set()
        done = run_transaction(
            engine, partial(_dispatch_pool, pool=pool, limit=limit, publish=publish, sent=sent)
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


def nudge(engine: Engine, publish: Publish, job_ids: str | Iterable[str] = ()) -> list[str]:
    """The fast path after a commit (a submit, a job's end): dispatch what the slots allow
    (its tasks sent in the dispatch transaction) and publish the outbox rows of `job_ids`.
    Failures are left to beat (the periodic dispatcher and the re-publisher)."""
    from orchestrator.scheduling.outbox import relay_quietly

    dispatched: list[str] = []
    started = time.monotonic()
    try:
        redis = getattr(publish, "redis", None) or _redis_for(get_settings().redis_url)
        dispatched = dispatch_once(engine, redis, publish=publish)
    except Exception:
        log.warning("dispatch fast path failed; the periodic dispatcher will retry", exc_info=True)
    given = [job_ids] if isinstance(job_ids, str) else sorted(set(job_ids))
    if given:
        relay_quietly(engine, publish, given)
    log.debug(
        "nudge: %d dispatched in %.1f ms", len(dispatched), 1e3 * (time.monotonic() - started)
    )
    return dispatched
