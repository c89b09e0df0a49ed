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
  On PostgreSQL every statement of a pass is fixed driver SQL (nothing built per call).

Capacity per worker: concurrency + a buffer (`slots.buffer_for`): the base
`sched_slot_buffer_per_worker`, or for short jobs as many as the worker runs in
`sched_buffer_lookahead_s` (by its queues' mean run time; at most
`sched_slot_buffer_max_per_worker`), so a worker of short jobs stays fed and one pass sends
several jobs. A pass then dispatches only once half of that extra is free
(`Pool.min_free`); jobs are in flight meanwhile, and each one's end runs a pass, so nothing
waits beyond those ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache, partial
from typing import Any, Final

from sqlalchemy import (
    Connection,
    Engine,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Row

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.db import commit_without_flush_wait
from orchestrator.jobs.families import FAMILIES, family_for
from orchestrator.scheduling import dispatch_writes, flows, slots
from orchestrator.scheduling import outbox as outbox_relay
from orchestrator.scheduling.decision import FLOW_WRITE, apply_plan, lock_queues, plan_queue, share
from orchestrator.scheduling.flows import (
    DISPATCHED,
    QUEUED,
    _as_flow,
    _insert_ignore,
    plan_cap,
    plan_weight,
)
from orchestrator.settings import get_settings
from orchestrator.tables import dispatch_queue, jobs, outbox

log = logging.getLogger(__name__)

FAMILY_QUEUES: Final = frozenset(f.queue for f in FAMILIES.values())
QUEUE_OF: Final = {name: f.queue for name, f in FAMILIES.items()}
__all__ = [
    "DISPATCHED",
    "QUEUED",
    "_as_flow",
    "_insert_ignore",
    "plan_cap",
    "plan_weight",
    "enqueue",
    "release",
    "taken",
    "dispatch_once",
    "nudge",
    "resend_stale",
]

Publish = Callable[[str, dict[str, Any]], None]


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
    now_s = (now or utcnow()).timestamp()
    if conn.dialect.name == "postgresql":
        flows.released(conn, job_id, now_s)  # the same, in one statement
    else:
        release_in_steps(conn, job_id, now_s)


def release_in_steps(conn: Connection, job_id: str, now_s: float) -> None:
    """`release` as two statements (SQLite; and the reference the one-statement form is
    tested against)."""
    gone = conn.execute(
        delete(dispatch_queue)
        .where(dispatch_queue.c.job_id == job_id)
        .returning(dispatch_queue.c.queue, dispatch_queue.c.account_id, dispatch_queue.c.state)
    ).first()
    if gone is None:
        return
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


def _dispatch_pool(
    conn: Connection,
    pool: slots.Pool,
    limit: int,
    publish: Publish | None = None,
    sent: set[str] | None = None,
) -> Dispatched:
    """One pool's dispatch decision and its writes, in the caller's transaction."""
    locked = lock_queues(conn, pool.queues)
    free = min(limit, pool.capacity - sum(r.in_flight for r in locked))
    if free < min(pool.min_free, limit) or free <= 0 or not any(r.work for r in locked):
        return Dispatched([], [])
    now = utcnow()
    now_s = now.timestamp()
    plans = []
    for r in locked:
        room = min(free, pool.slots.get(r.queue, 0) - r.in_flight)
        if r.work and room > 0:
            plans.append(plan_queue(conn, r.queue, float(r.vtime), room, now_s))
    shares = share(plans, free) if len(plans) > 1 else {p.queue: free for p in plans}
    taken_rows: list[Row[Any]] = []
    flow_writes: list[dict[str, Any]] = []
    vtimes = []
    plan_of: dict[tuple[str, str], str] = {}
    for plan in plans:
        if shares.get(plan.queue, 0) <= 0:
            continue
        before = plan.vtime
        entries, writes = apply_plan(conn, plan, shares[plan.queue], now_s)
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
    if conn.dialect.name == "postgresql":  # every write in one fixed statement
        conn.exec_driver_sql(
            dispatch_writes.WRITE_RELAXED_SQL if publish is not None else dispatch_writes.WRITE_SQL,
            dispatch_writes.write_params(
                now, taken_rows, flow_writes, vtimes, published=publish is not None
            ),
        )
    else:
        dispatch_writes.write_in_steps(
            conn, now, taken_rows, flow_writes, vtimes, published=publish is not None
        )
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
        if conn.dialect.name != "postgresql":  # (the PostgreSQL write statement set it)
            commit_without_flush_wait(conn)  # what it wrote is safe to lose (see the docstring)
    waits = [
        (plan_of[(t.queue, t.account_id)], (now - t.enqueued_at).total_seconds())
        for t in taken_rows
    ]
    return Dispatched(ids, waits)


def _publish(publish: Publish, entries: list[Row[Any]], sent: set[str] | None) -> set[str]:
    """Send the tasks (before COMMIT); a failure leaves the rest to the re-publisher.
    `sent` remembers what an earlier attempt of the same transaction already sent. A
    publisher with `many` (dispatch.Publisher) pipelines them: one round trip per batch."""
    done = {t.job_id for t in entries if sent is not None and t.job_id in sent}
    todo = [t for t in entries if t.job_id not in done]
    many = getattr(publish, "many", None)
    if many is not None:  # (it logs a failure itself)
        done.update(t.job_id for t in todo[: many([_message(t) for t in todo])])
        todo = []
    for t in todo:
        try:
            publish(*_message(t))
        except Exception:
            log.warning("dispatch publish failed; the re-publisher will send it", exc_info=True)
            break
        done.add(t.job_id)
    if sent is not None:
        sent |= done
    return done


def _message(entry: Row[Any]) -> tuple[str, dict[str, Any]]:
    return "dispatch", {"job_id": entry.job_id, "type": entry.task}


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
    return _dispatch_all(engine, redis, limit, publish, [])[0]


def _pool_transaction(
    conn: Connection,
    pool: slots.Pool,
    limit: int,
    publish: Publish | None,
    sent: set[str],
    relay_ids: list[str],
) -> Dispatched:
    # The relay first: the dispatch's locks (the queue rows, the picked flows' rows, which a
    # job's finish and a submit also update) are then held for the dispatch alone.
    marked = False
    if relay_ids and publish is not None:
        marked = outbox_relay.relay_in(conn, publish, relay_ids) > 0
    done = _dispatch_pool(conn, pool=pool, limit=limit, publish=publish, sent=sent)
    if marked and not done.job_ids and conn.dialect.name != "postgresql":
        commit_without_flush_wait(conn)  # published marks: safe to lose
    return done


def _dispatch_all(
    engine: Engine, redis: Any, limit: int | None, publish: Publish | None, relay_ids: list[str]
) -> tuple[list[str], bool]:
    """dispatch_once, relaying `relay_ids` in the first pool's transaction; returns the
    job ids dispatched and whether the relay ran."""
    settings = get_settings()
    limit = limit or settings.dispatch_batch_max
    workers, run_s = slots.live_and_run_s(redis)
    base = settings.sched_slot_buffer_per_worker
    buffer = partial(
        slots.buffer_for,
        run_s=run_s,
        base=base,
        lookahead_s=settings.sched_buffer_lookahead_s,
        most=settings.sched_slot_buffer_max_per_worker,
        queue_of=QUEUE_OF,
    )
    pools = slots.pools(workers, buffer, FAMILY_QUEUES, base_buffer=base)
    out: list[str] = []
    waits: list[tuple[str, float]] = []
    relayed = False
    for pool in pools:
        sent: set[str] = set()
        done = run_transaction(
            engine,
            partial(
                _pool_transaction,
                pool=pool,
                limit=limit,
                publish=publish,
                sent=sent,
                relay_ids=[] if relayed else relay_ids,
            ),
        )
        relayed = True
        out += done.job_ids
        waits += done.waits
    if waits:
        try:
            slots.record_waits(redis, waits)
        except Exception:  # a metric only
            log.warning("queue wait histogram not recorded", exc_info=True)
    return out, relayed


RESEND_BATCH_MAX: Final = 100


def resend_stale(
    engine: Engine,
    publish: Publish,
    now: datetime | None = None,
    limit: int = RESEND_BATCH_MAX,
) -> list[str]:
    """Send again the tasks of up to `limit` jobs dispatched over `dispatch_resend_after_s`
    ago that no worker has begun (still `dispatched`): a delivery lost between the broker
    and a worker (a Redis restart as it was taken) would otherwise wait for the broker's
    visibility timeout (hours) or the job's deadline. At least once, as every dispatch: a
    worker that gets a duplicate finds the job begun and leaves it. Each resent entry's
    `dispatched_at` is moved to now, so a job waiting behind a long one in its Celery queue
    gets one duplicate per interval, not one per sweep. Beat's re-publisher runs it."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=get_settings().dispatch_resend_after_s)

    def work(conn: Connection) -> list[str]:
        rows: list[Any] = list(
            conn.execute(
                select(dispatch_queue.c.id, dispatch_queue.c.job_id, dispatch_queue.c.task)
                .join(jobs, jobs.c.id == dispatch_queue.c.job_id)
                .where(
                    dispatch_queue.c.queue.in_(sorted(FAMILY_QUEUES)),
                    dispatch_queue.c.state == DISPATCHED,
                    dispatch_queue.c.dispatched_at <= cutoff,
                    jobs.c.status == DISPATCHED,
                )
                .order_by(dispatch_queue.c.dispatched_at)
                .limit(limit)
                .with_for_update(of=dispatch_queue, skip_locked=True)
            ).all()
        )
        sent = _publish(publish, rows, None)
        if not sent:
            return []
        conn.execute(
            update(dispatch_queue)
            .where(dispatch_queue.c.id.in_([r.id for r in rows if r.job_id in sent]))
            .values(dispatched_at=now)
        )
        commit_without_flush_wait(conn)  # losing it only means sending once more
        return [r.job_id for r in rows if r.job_id in sent]

    resent = run_transaction(engine, work)
    if resent:
        log.warning("dispatch resent for %d jobs no worker began: %s", len(resent), resent[:10])
    return resent


@lru_cache(maxsize=4)
def _redis_for(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, decode_responses=True)


def nudge(engine: Engine, publish: Publish, job_ids: str | Iterable[str] = ()) -> list[str]:
    """The fast path after a commit (a submit, a job's end): dispatch what the slots allow
    (its tasks sent in the dispatch transaction) and publish the outbox rows of `job_ids`
    (in the same transaction). Failures are left to beat (the periodic dispatcher and the
    re-publisher)."""
    from orchestrator.scheduling.outbox import relay_quietly

    dispatched: list[str] = []
    relayed = False
    started = time.monotonic()
    given = [job_ids] if isinstance(job_ids, str) else sorted(set(job_ids))
    try:
        redis = getattr(publish, "redis", None) or _redis_for(get_settings().redis_url)
        dispatched, relayed = _dispatch_all(engine, redis, None, publish, given)
    except Exception:
        log.warning("dispatch fast path failed; the periodic dispatcher will retry", exc_info=True)
    if given and not relayed:  # no live worker, or the dispatch failed
        relay_quietly(engine, publish, given)
    log.debug(
        "nudge: %d dispatched in %.1f ms", len(dispatched), 1e3 * (time.monotonic() - started)
    )
    return dispatched
