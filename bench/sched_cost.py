"""Benchmark: the orchestrator side of one job, in one process, with or without the scheduler.

Per job: submit -> its fast path (the scheduler's `nudge`; in a tree without the scheduler,
the outbox relay) -> settle the oldest dispatched job -> its fast path. No worker runs: a
worker of 2 slots is announced in Redis, so the scheduler admits and dispatches as it would.
Prints SQL statements and this process's CPU ms per job. No run time is recorded here, so
the scheduler keeps its base buffer and runs one dispatch decision per job end (its most
expensive case; short jobs on a real worker get a larger buffer and share passes). Run it
in another tree (a checkout before the scheduler) with
`PYTHONPATH=/that/tree python bench/sched_cost.py`; it uses only interfaces both have.
bench/fairness.py runs it here and in --baseline-tree.

Usage: python bench/sched_cost.py [--jobs 100] [--redis-db 12]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import event, select

sys.path.insert(0, os.environ.get("PYTHONPATH", "").split(":")[0] or str(Path(__file__).parents[1]))

from bench.ledger import bench_database  # noqa: E402
from bench.lifecycle import ADMIN_URL  # noqa: E402

SPEC = {"type": "txt2img", "prompt": "p", "steps": 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="jobs measured (<= 2000)")
    parser.add_argument("--redis-db", type=int, default=12)
    args = parser.parse_args()
    n = max(10, min(args.jobs, 2000))
    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    redis.Redis.from_url(redis_url).flushdb()
    try:
        from bench.bench_env import bench_secrets
    except ImportError:  # a tree from before bench_env
        bench_secrets = dict  # type: ignore[assignment]
    with bench_database(None, ADMIN_URL) as db_url:
        os.environ.update(
            {
                "TOLLGATE_DATABASE_URL": db_url,
                "TOLLGATE_REDIS_URL": redis_url,
                "TOLLGATE_STORAGE_URL": f"/tmp/tollgate-sched-cost-{os.getpid()}",
                **bench_secrets(),
            }
        )
        from billing import ledger
        from billing.clock import utcnow
        from billing.db import make_engine, run_transaction
        from orchestrator.jobs import service as jobs
        from orchestrator.jobs.records import lock_job
        from orchestrator.scheduling.dispatch import Publisher
        from orchestrator.settlement.settle import settle
        from orchestrator.storage import Storage
        from orchestrator.tables import jobs as job_rows

        engine = make_engine(db_url)
        storage = Storage(os.environ["TOLLGATE_STORAGE_URL"])
        publisher = Publisher(redis_url)
        fast: Any
        try:
            from orchestrator.scheduling import scheduler, slots

            slots.announce(publisher.redis, slots.WorkerSlots("bench", ("gpu.txt2img",), 2), 600)
            label = "with the scheduler"

            def fast(job_id: str) -> None:
                scheduler.nudge(engine, publisher, job_id)
        except ImportError:
            from orchestrator.scheduling.outbox import relay_quietly

            label = "without the scheduler"

            def fast(job_id: str) -> None:
                relay_quietly(engine, publisher, job_id)

        def account(conn: Any) -> str:
            acc = ledger.create_account(conn, "bench", "business")
            ledger.grant(conn, acc, "image", 10**6, source="adjustment", reference=f"r-{acc}")
            return str(acc)

        acc = run_transaction(engine, account)

        def oldest(conn: Any) -> str:
            return str(
                conn.execute(
                    select(job_rows.c.id)
                    .where(job_rows.c.account_id == acc, job_rows.c.status == "dispatched")
                    .order_by(job_rows.c.created_at)
                    .limit(1)
                ).scalar_one()
            )

        for _ in range(5):  # a backlog beyond the 2 slots + 1 buffer
            fast(str(jobs.submit(engine, storage, acc, SPEC).job["id"]))
        statements = 0

        def count(*_: Any) -> None:
            nonlocal statements
            statements += 1

        event.listen(engine, "before_cursor_execute", count)
        cpu0 = time.process_time()
        for _ in range(n):
            fast(str(jobs.submit(engine, storage, acc, SPEC).job["id"]))
            done = run_transaction(engine, oldest)
            statements -= 1  # the harness's lookup
            run_transaction(
                engine, lambda c, j=done: settle(c, lock_job(c, j), "succeeded", 1, utcnow())
            )
            fast(done)
        cpu_ms = (time.process_time() - cpu0) * 1000 / n
        engine.dispose()
    print(
        f"orchestrator side per job {label}: {statements / n:.1f} statements, {cpu_ms:.2f} CPU ms"
    )


if __name__ == "__main__":
    main()
