"""The fair scheduler end to end: real PostgreSQL, Redis and a Celery worker process that
announces its own slots. A flood does not delay another account, caps hold, a dispatcher
killed mid-batch loses and duplicates nothing, concurrent dispatchers never double-send."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, func, select

from billing.db import run_transaction
from orchestrator.jobs import service as jobs
from orchestrator.jobs.families import GPU_QUEUES
from orchestrator.scheduling import slots
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.scheduling.outbox import relay
from orchestrator.scheduling.queues import set_running_cap
from orchestrator.scheduling.scheduler import dispatch_once, nudge
from orchestrator.storage import Storage
from orchestrator.tables import dispatch_queue, job_results, outbox, sched_flows
from tests.ledger_helpers import grant, new_account
from tests.lifecycle_helpers import row, wait_terminal
from tests.support.services import celery_worker

CONCURRENCY = 2
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spec(test: str = "sleep:0.3") -> dict[str, Any]:
    return {
        "type": "txt2img",
        "prompt": f"test:{test}",
        "width": 512,
        "height": 512,
        "steps": 20,
    }


@pytest.fixture(scope="module")
def worker(
    service_env: dict[str, str], settings_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    with celery_worker(
        service_env, tmp_path_factory.mktemp("logs"), queues="gpu.txt2img", concurrency=CONCURRENCY
    ) as proc:
        yield proc


def account(engine: Engine, plan: str = "free", credits: int = 200) -> str:
    acc = new_account(engine, plan)
    grant(engine, acc, credits)
    return acc


def submit_many(engine: Engine, storage: Storage, acc: str, n: int, test: str) -> list[str]:
    return [str(jobs.submit(engine, storage, acc, spec(test)).job["id"]) for _ in range(n)]


def test_the_worker_announces_its_slots(redis_url: str, worker: Any) -> None:
    live = slots.live(redis.Redis.from_url(redis_url, decode_responses=True))
    mine = [w for w in live if w.queues == ("gpu.txt2img",)]
    assert mine and mine[0].concurrency == CONCURRENCY


def test_a_flood_does_not_delay_another_account(
    pg_engine: Engine, storage: Storage, redis_url: str, worker: Any
) -> None:
    publisher = Publisher(redis_url)
    # Earlier tests' short jobs would size a larger buffer; these 0.2 s ones keep the base.
    redis.Redis.from_url(redis_url).delete(slots.RUN_S_KEY)
    flood = account(pg_engine, "free")
    set_running_cap(pg_engine, flood, 100)  # no cap: only the fair order protects the other
    flooded = submit_many(pg_engine, storage, flood, 30, "sleep:0.2")
    nudge(pg_engine, publisher)
    polite = account(pg_engine, "standard")
    mine = submit_many(pg_engine, storage, polite, 3, "sleep:0.2")
    nudge(pg_engine, publisher)
    ends = {j: wait_terminal(pg_engine, j, 60) for j in mine}
    assert all(r.status == "succeeded" for r in ends.values())
    last_mine = max(r.started_at for r in ends.values())
    flood_rows = [wait_terminal(pg_engine, j, 90) for j in flooded]
    after = sum(1 for r in flood_rows if r.started_at > last_mine)
    # Slots were 2 + 1 buffer: at most 3 flood jobs were in flight when `polite` arrived,
    # and weight 4 to 1 puts its 3 jobs ahead of all but about one more.
    assert after >= 30 - 3 - 3, after
    assert all(r.status == "succeeded" for r in flood_rows)


def test_caps_are_respected(
    pg_engine: Engine, storage: Storage, redis_url: str, worker: Any
) -> None:
    capped = account(pg_engine, "free")  # cap 2
    set_running_cap(pg_engine, capped, 1)
    ids = submit_many(pg_engine, storage, capped, 5, "sleep:0.3")
    nudge(pg_engine, Publisher(redis_url))
    seen_max, deadline = 0, time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = [row(pg_engine, j) for j in ids]
        seen_max = max(seen_max, sum(1 for r in rows if r.status in ("dispatched", "running")))
        if all(r.status == "succeeded" for r in rows):
            break
        time.sleep(0.03)
    assert seen_max == 1
    assert all(row(pg_engine, j).status == "succeeded" for j in ids)
    assert sorted(ids, key=lambda j: row(pg_engine, j).started_at) == ids  # FIFO


KILLER = """
import os, signal, sys
from orchestrator.db import get_engine
from orchestrator.scheduling import scheduler
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.settings import get_settings

where = sys.argv[1]
real = scheduler._dispatch_pool

def dying(conn, **kw):
    out = real(conn, **kw)  # every statement of the batch ran, nothing is committed yet
    if where == "before-commit" and out.job_ids:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

scheduler._dispatch_pool = dying
redis = Publisher(get_settings().redis_url).redis
ids = scheduler.dispatch_once(get_engine(), redis)
if where == "after-commit" and ids:
    os.kill(os.getpid(), signal.SIGKILL)  # committed, nothing published
"""


def _dispatcher_killed(env: dict[str, str], where: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, where], env=env, cwd=REPO_ROOT, timeout=60, check=False
    )
    return proc.returncode


def _counts(engine: Engine, ids: list[str]) -> tuple[int, int]:
    def work(conn: Any) -> tuple[int, int]:
        sent = conn.execute(
            select(func.count())
            .select_from(outbox)
            .where(outbox.c.topic == "dispatch", outbox.c.job_id.in_(ids))
        ).scalar_one()
        queued = conn.execute(
            select(func.count())
            .select_from(dispatch_queue)
            .where(dispatch_queue.c.job_id.in_(ids), dispatch_queue.c.state == "queued")
        ).scalar_one()
        return sent, queued

    return run_transaction(engine, work)


@pytest.mark.parametrize("where", ["before-commit", "after-commit"])
def test_a_dispatcher_killed_mid_batch_loses_and_duplicates_nothing(
    pg_engine: Engine,
    storage: Storage,
    redis_url: str,
    service_env: dict[str, str],
    worker: Any,
    where: str,
) -> None:
    acc = account(pg_engine, "business")
    # Submitted without a nudge: they wait for the killed dispatcher.
    ids = submit_many(pg_engine, storage, acc, 3, "ok")
    assert _dispatcher_killed(service_env, where) == -signal.SIGKILL
    sent, queued = _counts(pg_engine, ids)
    if where == "before-commit":
        assert (sent, queued) == (0, 3)  # rolled back: all still queued, nothing sent
        assert {row(pg_engine, j).status for j in ids} == {"queued"}
        nudge(pg_engine, Publisher(redis_url))  # the next dispatcher
    else:
        assert sent >= 1 and sent + queued == 3  # dispatched in the outbox, never published
        relay(pg_engine, Publisher(redis_url))  # the re-publisher
        nudge(pg_engine, Publisher(redis_url))
    for j in ids:
        done = wait_terminal(pg_engine, j, 60)
        assert (done.status, done.charged) == ("succeeded", 1)
    assert _counts(pg_engine, ids) == (3, 0)  # one dispatch each
    applied = run_transaction(
        pg_engine,
        lambda c: c.execute(
            select(func.count())
            .select_from(job_results)
            .where(job_results.c.job_id.in_(ids), job_results.c.applied.is_(True))
        ).scalar_one(),
    )
    assert applied == 3
    flow = run_transaction(
        pg_engine,
        lambda c: c.execute(select(sched_flows).where(sched_flows.c.account_id == acc)).one(),
    )
    assert (flow.queued, flow.running) == (0, 0)  # the counters agree with the rows


def test_concurrent_dispatchers_never_double_dispatch(
    pg_engine: Engine, storage: Storage, redis_url: str, settings_env: None
) -> None:
    """No worker consumes gpu.post here: the announced slots alone bound what goes out."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.delete(slots.RUN_S_KEY)  # no run-time estimate: the base buffer
    fake = slots.WorkerSlots("announced-post", ("gpu.post",), 4)
    slots.announce(client, fake, ttl_s=120)
    accs = [account(pg_engine, "business") for _ in range(4)]
    ids: list[str] = []
    for acc in accs:
        ids += [
            str(
                jobs.submit(
                    pg_engine, storage, acc, {"type": "remove_background", "image_b64": _png()}
                ).job["id"]
            )
            for _ in range(5)
        ]
    results: list[list[str]] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        results.append([j for _ in range(5) for j in dispatch_once(pg_engine, client)])

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        sent = [j for r in results for j in r]
        capacity = slots.slots_per_queue(slots.live(client), 1)["gpu.post"]
        assert len(sent) == len(set(sent)) == capacity  # 4 slots + 1 buffer, each job once
        outbox_rows = run_transaction(
            pg_engine,
            lambda c: (
                c.execute(
                    select(outbox.c.job_id).where(
                        outbox.c.topic == "dispatch", outbox.c.job_id.in_(ids)
                    )
                )
                .scalars()
                .all()
            ),
        )
        assert sorted(outbox_rows) == sorted(sent)
    finally:
        slots.withdraw(client, fake)
        for j in ids:
            jobs.cancel(pg_engine, None, j)


def _png() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


assert "gpu.post" in GPU_QUEUES
