"""Benchmark: a worker's `begin` + `finish` for one plain job, the PL/pgSQL calls (migration
0011) against the Python path they stand in for, in one run on one fresh database.

N dispatched jobs per path; each is taken, delivers one output (stored) and is finished as
succeeded (its hold committed), in this process, in turn: one-call, Python, one-call...
It prints statements per job and this process's CPU ms per job (time.process_time: the
client side, what a worker spends), and the ratio. Not a throughput figure: it isolates
the worker's two transactions from Celery, Redis and the scheduler's dispatch.
Usage: python bench/worker_steps.py [--jobs 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, update

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ledger import bench_database  # noqa: E402
from bench.lifecycle import ADMIN_URL  # noqa: E402
from billing import ledger  # noqa: E402
from billing.db import make_engine, run_transaction  # noqa: E402
from orchestrator.execution import protocol as execution  # noqa: E402
from orchestrator.execution import result, start  # noqa: E402
from orchestrator.jobs import service as jobs  # noqa: E402
from orchestrator.jobs import states  # noqa: E402
from orchestrator.storage import Storage  # noqa: E402
from orchestrator.tables import jobs as jobs_table  # noqa: E402

JOBS_MAX = 2000
SPEC = {"type": "txt2img", "prompt": "bench", "steps": 20}


def dispatched(engine: Engine, storage: Storage, account: str, n: int) -> list[str]:
    ids = [jobs.submit(engine, storage, account, dict(SPEC)).job["id"] for _ in range(n)]
    run_transaction(
        engine,
        lambda c: c.execute(
            update(jobs_table).where(jobs_table.c.id.in_(ids)).values(status="dispatched")
        ),
    )
    return ids


def one_job(engine: Engine, storage: Storage, job_id: str, one_call: bool) -> None:
    if one_call:
        attempt = execution.begin(engine, job_id, "bench@host")
    else:
        token = os.urandom(16).hex()
        attempt = run_transaction(
            engine, lambda c: start._begin(c, job_id, token, "bench@host", execution.JOB_PHASE)
        )
    assert attempt is not None
    ctx = execution.RunContext(engine, storage, attempt)
    ctx.deliver(0, b"png", {"seed": 0})
    if one_call:
        status = execution.finish(engine, attempt, states.SUCCEEDED, ctx=ctx)
    else:
        status = run_transaction(
            engine,
            lambda c: result._finish(c, attempt, states.SUCCEEDED, None, execution.JOB_PHASE, ctx),
        )
    assert status == states.SUCCEEDED, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help=f"jobs per path (<= {JOBS_MAX})")
    args = parser.parse_args()
    n = max(10, min(args.jobs, JOBS_MAX))
    with bench_database(None, ADMIN_URL) as url, tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(url)
        storage = Storage(tmp)
        account = run_transaction(engine, lambda c: ledger.create_account(c, "bench", "business"))
        run_transaction(
            engine,
            lambda c: ledger.grant(
                c, account, "image", 10 * n, source="adjustment", reference=f"bench-{account}"
            ),
        )
        ids = {True: dispatched(engine, storage, account, n), False: []}
        ids[False] = dispatched(engine, storage, account, n)
        statements = {True: 0, False: 0}
        cpu_s = {True: 0.0, False: 0.0}
        path = [True]

        def count(*_: Any) -> None:
            statements[path[0]] += 1

        event.listen(engine, "before_cursor_execute", count)
        for i in range(n):
            for one_call in (True, False):
                path[0] = one_call
                started = time.process_time()
                one_job(engine, storage, ids[one_call][i], one_call)
                cpu_s[one_call] += time.process_time() - started
        event.remove(engine, "before_cursor_execute", count)
        engine.dispose()
    print(f"jobs per path: {n}; begin + deliver + finish, one process")
    print(f"{'path':<34}{'statements/job':>16}{'CPU ms/job':>12}")
    for one_call, name in ((False, "Python (SQLAlchemy Core)"), (True, "one call each (PL/pgSQL)")):
        per = statements[one_call] / n
        print(f"{name:<34}{per:>16.1f}{cpu_s[one_call] * 1000 / n:>12.2f}")
    print(f"{'CPU ratio one-call / Python':<34}{'':>16}{cpu_s[True] / cpu_s[False]:>12.2f}")


if __name__ == "__main__":
    main()
