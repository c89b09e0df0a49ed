"""Benchmark: the fair scheduler (orchestrator.scheduling), in one run on real services.

A fresh PostgreSQL database, one Redis db, one real Celery worker (2 prefork processes,
tests.support.worker_app: the product's tasks with scripted runners; each job sleeps
--run-s). Sections, ratios measured in the same run:

1. noisy neighbour: a free account floods --flood jobs, then a standard account submits 5.
   The standard account's median and max wait (created -> started) in job run times.
   Targets: median <= 2, max <= 4.
2. equal shares: 4 standard accounts flood at once; Jain's index of jobs completed per
   account over the window in which all are backlogged. Target >= 0.95.
3. weights: a standard and a free account flood at once; the completed-job ratio while
   both are backlogged. Target within 20% of 4.
4. decision cost: one dispatch decision (10 picks) with 1,000 and with 100,000 jobs queued
   across 10,000 accounts (rows bulk-inserted; each decision rolled back).
5. cost (with --baseline-tree DIR, e.g. a checkout from before the scheduler): the
   orchestrator side of one job in statements and CPU ms (bench/sched_cost.py), and
   bench/lifecycle.py's ratio, here and in DIR, one after the other. Target: the ratio
   drops by no more than 10%.

Usage: python bench/fairness.py [--flood 500] [--run-s 0.1] [--baseline-tree /path]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, event, insert, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_env import bench_secrets  # noqa: E402
from bench.ledger import bench_database  # noqa: E402
from bench.lifecycle import ADMIN_URL, spawn, wait_log  # noqa: E402
from billing import ledger  # noqa: E402
from billing.clock import utcnow  # noqa: E402
from billing.db import make_engine, run_transaction  # noqa: E402
from billing.tables import accounts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 600
WORKER_PROCESSES = 2


def make_account(engine: Engine, plan: str) -> str:
    def work(conn: Any) -> str:
        acc = ledger.create_account(conn, "bench", plan)
        ledger.grant(conn, acc, "image", 100_000, source="adjustment", reference=f"b-{acc}")
        return str(acc)

    return run_transaction(engine, work)


def spec(run_s: float) -> dict[str, Any]:
    return {"type": "txt2img", "prompt": f"test:sleep:{run_s}", "steps": 20}


def submit(
    engine: Engine, storage: Any, publisher: Any, acc: str, n: int, run_s: float
) -> list[str]:
    """`n` jobs, each followed by a nudge, as every way in does after its commit."""
    from orchestrator.jobs import service as jobs
    from orchestrator.scheduling.scheduler import nudge

    ids = []
    for _ in range(n):
        ids.append(str(jobs.submit(engine, storage, acc, spec(run_s)).job["id"]))
        nudge(engine, publisher, ids[-1])
    return ids


def rows(engine: Engine, ids: list[str]) -> list[Any]:
    from orchestrator.tables import jobs

    return list(
        run_transaction(engine, lambda c: c.execute(select(jobs).where(jobs.c.id.in_(ids))).all())
    )


def pump(engine: Engine, publisher: Any, until: Any, timeout_s: float = RUN_TIMEOUT_S) -> None:
    """The periodic dispatcher's job (beat is not running here), plus the worker's nudges."""
    from orchestrator.scheduling.scheduler import nudge

    deadline = time.monotonic() + timeout_s
    while not until():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        nudge(engine, publisher)
        time.sleep(0.2)


def cancel_rest(engine: Engine, ids: list[str]) -> None:
    """Cancel what is left; the accounts' caps go to 0 first, so that no nudge dispatches
    the rest while they are being canceled (their tasks would only be skipped)."""
    from orchestrator.jobs import service as jobs
    from orchestrator.jobs.states import ACTIVE
    from orchestrator.scheduling.queues import set_running_cap

    left = [r for r in rows(engine, ids) if r.status in ACTIVE]
    for account in {r.account_id for r in left}:
        set_running_cap(engine, account, 0)
    for r in left:
        if r.status in ACTIVE:
            with contextlib.suppress(Exception):  # ended meanwhile
                jobs.cancel(engine, None, r.id)


def run_time_s(done: list[Any]) -> float:
    times = [(r.finished_at - r.started_at).total_seconds() for r in done if r.started_at]
    return statistics.median(times)


def noisy_neighbour(engine: Engine, storage: Any, publisher: Any, flood: int, run_s: float) -> str:
    free, std = make_account(engine, "free"), make_account(engine, "standard")
    flooded = submit(engine, storage, publisher, free, flood, run_s)
    pump(
        engine, publisher, lambda: sum(r.started_at is not None for r in rows(engine, flooded)) >= 3
    )
    mine = submit(engine, storage, publisher, std, 5, run_s)
    pump(engine, publisher, lambda: all(r.finished_at for r in rows(engine, mine)))
    done = rows(engine, mine)
    unit = run_time_s([r for r in rows(engine, flooded) if r.finished_at] + done)
    waits = sorted((r.started_at - r.created_at).total_seconds() / unit for r in done)
    starts = sorted(r.started_at for r in rows(engine, flooded) + done if r.started_at)
    cycle = WORKER_PROCESSES * (starts[-1] - starts[0]).total_seconds() / (len(starts) - 1)
    cancel_rest(engine, flooded)
    med, worst = statistics.median(waits), max(waits)
    ok = "MET" if med <= 2 and worst <= 4 else "NOT MET"
    return (
        f"noisy neighbour: standard waits median {med:.2f}, max {worst:.2f} run times "
        f"(run time {unit * 1000:.0f} ms; targets 2 / 4) {ok}; waits "
        f"{', '.join(f'{w:.2f}' for w in waits)}; a slot's cycle {cycle * 1000:.0f} ms "
        f"(= run time + {(cycle - unit) * 1000:.0f} ms between jobs)"
    )


def completed_in_window(engine: Engine, groups: dict[str, list[str]]) -> dict[str, int]:
    """Jobs finished per account while every account was backlogged: from the moment the
    last account's first job was queued to the moment the first account's last job left
    the line (started). After that, that account has nothing queued and the others take
    its slots, so counting finishes up to its last *finish* (as before) credits them with
    the slots its last jobs no longer competed for."""
    got = {a: rows(engine, ids) for a, ids in groups.items()}
    start = max(min(r.created_at for r in v) for v in got.values())
    end = min(max(r.started_at for r in v if r.started_at) for v in got.values())
    return {
        a: sum(1 for r in v if r.finished_at and start <= r.finished_at <= end)
        for a, v in got.items()
    }


def submit_interleaved(
    engine: Engine, storage: Any, publisher: Any, accs: list[str], n: int, run_s: float
) -> dict[str, list[str]]:
    """`n` jobs per account, submitted in turns, so all are backlogged from the start."""
    groups: dict[str, list[str]] = {a: [] for a in accs}
    for _ in range(n):
        for a in accs:
            groups[a] += submit(engine, storage, publisher, a, 1, run_s)
    return groups


def shares(engine: Engine, storage: Any, publisher: Any, run_s: float, per: int) -> str:
    accs = [make_account(engine, "standard") for _ in range(4)]
    groups = submit_interleaved(engine, storage, publisher, accs, per, run_s)
    pump(
        engine,
        publisher,
        lambda: any(all(r.finished_at for r in rows(engine, ids)) for ids in groups.values()),
    )
    counts = completed_in_window(engine, groups)
    for ids in groups.values():
        cancel_rest(engine, ids)
    xs = list(counts.values())
    jain = sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))
    ok = "MET" if jain >= 0.95 else "NOT MET"
    return f"equal shares: completed {xs}, Jain's index {jain:.3f} (target >= 0.95) {ok}"


def weights(engine: Engine, storage: Any, publisher: Any, run_s: float, per: int) -> str:
    from orchestrator.scheduling.queues import set_running_cap

    std, free = make_account(engine, "standard"), make_account(engine, "free")
    # Caps above the slots, so only the weights decide (the default free cap of 2 would
    # otherwise bind first on a 3-slot worker).
    set_running_cap(engine, free, 100)
    by = submit_interleaved(engine, storage, publisher, [std, free], per, run_s)
    groups = {"standard": by[std], "free": by[free]}
    pump(engine, publisher, lambda: all(r.finished_at for r in rows(engine, groups["standard"])))
    counts = completed_in_window(engine, groups)
    for ids in groups.values():
        cancel_rest(engine, ids)
    ratio = counts["standard"] / max(1, counts["free"])
    ok = "MET" if abs(ratio - 4) <= 0.8 else "NOT MET"
    return (
        f"weights: standard {counts['standard']} : free {counts['free']} = {ratio:.2f} "
        f"(target 4 +- 20%) {ok}"
    )


def decision_cost(engine: Engine, queued: int, n_accounts: int) -> tuple[float, float]:
    """Milliseconds per dispatch decision of 10 picks with `queued` jobs over `n_accounts`
    accounts on a scratch queue (bulk-inserted rows; each decision rolled back), and the
    SQL statements one decision runs."""
    from orchestrator.scheduling import scheduler
    from orchestrator.tables import dispatch_queue, jobs, sched_flows, sched_queues

    queue = f"bench.{secrets.token_hex(3)}"
    now = utcnow()
    accs = [f"acct_b{secrets.token_hex(6)}" for _ in range(n_accounts)]
    with engine.begin() as conn:
        conn.execute(
            insert(accounts),
            [{"id": a, "name": "b", "plan": "free", "created_at": now} for a in accs],
        )
        job_rows, entries = [], []
        for i in range(queued):
            jid = f"job_b{secrets.token_hex(10)}"
            job_rows.append(
                {
                    "id": jid, "account_id": accs[i % n_accounts], "type": "txt2img", "spec": {},
                    "status": "queued", "credit_kind": "image", "price": 1, "price_per_output": 1,
                    "outputs_expected": 1, "outputs": [], "source": "cli", "attempt": 0,
                    "deadline_at": now + timedelta(hours=1), "created_at": now, "updated_at": now,
                }
            )  # fmt: skip
            entries.append(
                {"job_id": jid, "task": "txt2img", "queue": queue,
                 "account_id": accs[i % n_accounts], "state": "queued", "enqueued_at": now}
            )  # fmt: skip
        for start in range(0, queued, 5000):
            conn.execute(insert(jobs), job_rows[start : start + 5000])
            conn.execute(insert(dispatch_queue), entries[start : start + 5000])
        per = queued // n_accounts
        conn.execute(
            insert(sched_flows),
            [
                {"queue": queue, "account_id": a, "plan": "free", "weight": 1.0, "cap": 2,
                 "running": 0, "queued": per, "finish_tag": 0.0, "head_tag": i * 0.001,
                 "head_since_s": now.timestamp(), "sort_key": i * 0.001, "eligible": True}
                for i, a in enumerate(accs)
            ],
        )  # fmt: skip
        conn.execute(insert(sched_queues).values(queue=queue, vtime=0.0))
    with engine.connect() as conn:  # what autovacuum does after a bulk load
        conn.execute(text("ANALYZE jobs, dispatch_queue, sched_flows"))
        conn.commit()
    times = []
    statements = 0

    def count(*_: Any) -> None:
        nonlocal statements
        statements += 1

    event.listen(engine, "before_cursor_execute", count)
    for _ in range(20):
        with engine.connect() as conn:
            trans = conn.begin()
            t0 = time.perf_counter()
            picked = scheduler._dispatch_queue(conn, queue, 10, 10)
            times.append(time.perf_counter() - t0)
            trans.rollback()
        assert len(picked.job_ids) == 10, picked
    event.remove(engine, "before_cursor_execute", count)
    return statistics.median(times) * 1000, statements / 20


def lifecycle_ratio(tree: Path, jobs_n: int) -> float:
    out = subprocess.run(
        [sys.executable, "bench/lifecycle.py", "--jobs", str(jobs_n), "--seconds", "1"],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S, check=True,
    )  # fmt: skip
    match = re.search(r"ratio \(target >= [0-9.]+\)\s+([0-9.]+)", out.stdout)
    if match is None:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    return float(match.group(1))


def sched_cost(tree: Path) -> str:
    """bench/sched_cost.py (this tree's script) run against `tree`'s code."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sched_cost.py")],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S, check=True,
    )  # fmt: skip
    return f"{out.stdout.strip().splitlines()[-1]} ({tree})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=500, help="noisy neighbour's jobs (<= 2000)")
    parser.add_argument("--per", type=int, default=40, help="jobs per account in 2 (<= 500)")
    parser.add_argument("--per-weights", type=int, default=120, help="jobs per account in 3")
    parser.add_argument("--run-s", type=float, default=0.1, help="each job's run time")
    parser.add_argument("--queued", type=int, default=100_000, help="jobs queued in 4 (<= 200000)")
    parser.add_argument("--baseline-tree", type=Path, help="a checkout to compare the cost with")
    parser.add_argument("--lifecycle-jobs", type=int, default=200)
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument("--skip", default="", help="comma-separated sections to skip (1..5)")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    redis.Redis.from_url(redis_url).flushdb()
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"tollgate-fairness-{secrets.token_hex(3)}"
    logs.mkdir(parents=True)
    lines: list[str] = []
    with bench_database(None, ADMIN_URL) as db_url:
        env = {
            **os.environ,
            "TOLLGATE_DATABASE_URL": db_url,
            **bench_secrets(),
            "TOLLGATE_REDIS_URL": redis_url,
            "TOLLGATE_STORAGE_URL": str(logs / "storage"),
            "PYTHONUNBUFFERED": "1",
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith("TOLLGATE_")})
        from orchestrator.scheduling.dispatch import Publisher
        from orchestrator.storage import Storage

        engine = make_engine(db_url)
        storage = Storage(str(logs / "storage"))
        publisher = Publisher(redis_url)
        worker = spawn(
            [sys.executable, "-m", "celery", "-A", "tests.support.worker_app", "worker", "-Q",
             "gpu.txt2img", "-c", str(WORKER_PROCESSES), "-P", "prefork", "--without-mingle",
             "--without-gossip", "-l", "info"],
            env, logs / "worker.log",
        )  # fmt: skip
        try:
            wait_log(logs / "worker.log", b"ready.")
            time.sleep(1)
            flood = max(10, min(args.flood, 2000))
            per = max(10, min(args.per, 500))
            if "1" not in skip:
                lines.append(noisy_neighbour(engine, storage, publisher, flood, args.run_s))
                print(lines[-1], flush=True)
            if "2" not in skip:
                lines.append(shares(engine, storage, publisher, args.run_s, per))
                print(lines[-1], flush=True)
            if "3" not in skip:
                per_w = max(10, min(args.per_weights, 500))
                lines.append(weights(engine, storage, publisher, args.run_s, per_w))
                print(lines[-1], flush=True)
        finally:
            worker.terminate()
            worker.wait(timeout=30)
        if "4" not in skip:
            queued = max(1000, min(args.queued, 200_000))
            small, n_small = decision_cost(engine, 1000, 1000)
            large, n_large = decision_cost(engine, queued, 10_000)
            lines.append(
                f"decision cost (10 picks): {small:.1f} ms, {n_small:.0f} statements with 1,000 "
                f"queued / 1,000 accounts; {large:.1f} ms, {n_large:.0f} statements with "
                f"{queued:,} queued / 10,000 accounts"
            )
            print(lines[-1], flush=True)
        engine.dispose()
    if args.baseline_tree is not None and "5" not in skip:
        for tree in (ROOT, args.baseline_tree):
            lines.append(sched_cost(tree))
            print(lines[-1], flush=True)
        here = lifecycle_ratio(ROOT, args.lifecycle_jobs)
        base = lifecycle_ratio(args.baseline_tree, args.lifecycle_jobs)
        drop = 1 - here / base
        lines.append(
            f"cost: lifecycle ratio {here:.2f} here vs {base:.2f} baseline "
            f"(change {-drop * 100:+.0f}%; target: a drop of at most 10%) "
            f"{'MET' if drop <= 0.10 else 'NOT MET'}"
        )
        print(lines[-1], flush=True)
    print(f"(shared {os.cpu_count()}-core machine; logs in {logs})")


if __name__ == "__main__":
    main()
