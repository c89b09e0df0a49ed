"""Benchmark: the whole job path versus raw Celery, in one run on the same Redis.

1. Baseline: raw Celery no-op round trips (send N tasks, wait for every result).
2. Path: N jobs through the Redis queue (XADD tollgate:jobs) -> intake prices and holds ->
   outbox dispatch -> a worker whose runner delivers one 8x8 PNG -> commit. Jobs/s from the
   first XADD to the last job settled. Target (issue 13): path / baseline >= 0.45.
3. Latency of POST /v1/jobs (p50/p99) at a fixed request rate against `tollgate api`,
   after one second of warm-up requests.

For 1 and 2 it also prints the CPU milliseconds per job each process group used (PostgreSQL,
Redis, the Celery worker, the intake, this client), from /proc: on a small machine where all
of them share the cores, that is where the ratio comes from. Only this bench's processes are
counted (its own redis-server, its children, the PostgreSQL backends of its database), so
other work on a shared box does not land in the figures (bench/cpu.py).

Same worker (2 prefork processes), same Redis (a redis-server of its own, no persistence, on
a free port), same PostgreSQL database in every part. `--profile DIR` records py-spy raw
stacks (samples holding the GIL) of the worker, its pool children included, and of the
intake during part 2.
Usage: python bench/lifecycle.py [--jobs 200] [--rate 20] [--seconds 5] [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import cpu, pg_profile  # noqa: E402
from bench.bench_env import bench_secrets, funded_accounts  # noqa: E402
from bench.ledger import bench_database  # noqa: E402
from bench.soak.processes import wait_port  # noqa: E402
from billing.db import make_engine, run_transaction  # noqa: E402
from orchestrator.jobs.states import TERMINAL  # noqa: E402
from orchestrator.standalone import free_port, redis_server_binary  # noqa: E402
from orchestrator.tables import jobs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get(
    "TOLLGATE_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
QUEUES = "gpu.txt2img,gpu.post,tollgate.maintenance,tollgate.callbacks,celery"
READY_TIMEOUT_S = 60
RUN_TIMEOUT_S = 300
TARGET_RATIO = 0.45


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_log(log: Path, marker: bytes) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while marker not in log.read_bytes():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{log} never said {marker!r}: {log.read_text()[-2000:]}")
        time.sleep(0.1)


def py_spy(pid: int, out: Path, *, subprocesses: bool, idle: bool) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` until SIGINT (raw collapsed stacks, 200 Hz). Only samples that
    hold the GIL (`--gil`): where the CPU goes, not where the process waits; with `idle`,
    every thread's samples (`--idle`)."""
    argv = [str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(pid)]
    # `--profile-idle`: every thread's samples, waiting included (where wall time goes).
    argv += ["-f", "raw", "-o", str(out), "-r", "200", "--idle" if idle else "--gil"]
    if subprocesses:
        argv.append("--subprocesses")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def redis_calls(url: str) -> dict[str, int]:
    """Calls per Redis command so far (INFO commandstats of the bench's own server)."""
    stats = redis.Redis.from_url(url).info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def pg_counts(engine: Any) -> dict[str, int]:
    """Commits and rows written so far in the bench's database (pg_stat_database)."""
    row = run_transaction(
        engine,
        lambda c: c.exec_driver_sql(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).one(),
    )
    return dict(zip(("commits", "inserted", "updated", "deleted"), map(int, row), strict=True))


def per_job(before: dict[str, int], after: dict[str, int], n: int) -> str:
    diff = {k: (v - before.get(k, 0)) / n for k, v in after.items()}
    top = sorted(((k, v) for k, v in diff.items() if v >= 0.05), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v:.1f}" for k, v in top)


def baseline(redis_url: str, n: int, scope: cpu.Scope) -> tuple[float, dict[str, float]]:
    """Raw Celery no-op round trips per second, and CPU ms per round trip by process group."""
    from celery import Celery

    app = Celery("bench", broker=redis_url, backend=redis_url)
    app.send_task("bench.noop").get(timeout=30)  # warm up
    before = cpu.snapshot(scope)
    start = time.perf_counter()
    results = [app.send_task("bench.noop", queue="celery") for _ in range(n)]
    for r in results:
        r.get(timeout=RUN_TIMEOUT_S)
    rate = n / (time.perf_counter() - start)
    return rate, cpu.per_job_ms(before, cpu.snapshot(scope), n)


def whole_path(
    engine: Any, redis_url: str, account_ids: list[str], n: int, scope: cpu.Scope
) -> tuple[float, dict[str, float]]:
    """Jobs per second from the first XADD to the last job settled, and CPU ms per job.
    Job i belongs to account i mod len(account_ids)."""
    client = redis.Redis.from_url(redis_url)
    messages = [
        json.dumps(
            {
                "account_id": account_ids[i % len(account_ids)],
                "idempotency_key": f"bench-{i}",
                "spec": {"type": "txt2img", "prompt": "bench", "steps": 20},
            }
        )
        for i in range(n)
    ]
    before = cpu.snapshot(scope)
    start = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for m in messages:
        pipe.xadd("tollgate:jobs", {"job": m})
    pipe.execute()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        done = run_transaction(
            engine,
            lambda c: c.execute(
                select(func.count())
                .select_from(jobs)
                .where(jobs.c.account_id.in_(account_ids), jobs.c.status.in_(sorted(TERMINAL)))
            ).scalar_one(),
        )
        if done >= n:
            rate = n / (time.perf_counter() - start)
            return rate, cpu.per_job_ms(before, cpu.snapshot(scope), n)
        time.sleep(0.02)
    raise RuntimeError("jobs did not finish in time")


def api_latency(api_url: str, api_key: str, rate: float, seconds: float) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()
    body = {"type": "txt2img", "prompt": "bench", "steps": 20}

    def one(client: httpx.Client) -> None:
        t0 = time.perf_counter()
        r = client.post("/v1/jobs", json=body)
        elapsed = time.perf_counter() - t0
        if r.status_code == 202:
            with lock:
                latencies.append(elapsed)

    threads = []
    with httpx.Client(
        base_url=api_url,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=30,
        limits=httpx.Limits(max_connections=64),
    ) as client:
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t = threading.Thread(target=one, args=(client,))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
    return latencies


Measured = tuple[float, dict[str, float], float, dict[str, float], list[float]]


def measure(args: argparse.Namespace, n: int, logs: Path, redis_url: str) -> Measured:
    """Parts 1-3 on a fresh database, with the worker, the intake and the API running."""
    with bench_database(None, ADMIN_URL) as db_url:
        scope = cpu.Scope(os.getpid(), db_url.rsplit("/", 1)[1])
        env = {
            **os.environ,
            "TOLLGATE_DATABASE_URL": db_url,
            **bench_secrets(),
            "TOLLGATE_REDIS_URL": redis_url,
            "TOLLGATE_STORAGE_URL": str(logs / "storage"),
            "PYTHONUNBUFFERED": "1",
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith("TOLLGATE_")})
        engine = make_engine(db_url)
        created = funded_accounts(engine, args.accounts, 1_000_000)
        new = created[0]
        api_port = free_port()
        procs = [
            spawn(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "bench.noop_app",
                    "worker",
                    "-Q",
                    QUEUES,
                    "-c",
                    "2",
                    "-P",
                    "prefork",
                    "--without-mingle",
                    "--without-gossip",
                    "-l",
                    "warning",
                ],
                env,
                logs / "worker.log",
            ),
            spawn([sys.executable, "-m", "orchestrator", "intake"], env, logs / "intake.log"),
            spawn(
                [sys.executable, "-m", "orchestrator", "api", "--port", str(api_port)],
                env,
                logs / "api.log",
            ),
        ]
        try:
            wait_log(logs / "api.log", b"Uvicorn running")
            time.sleep(2)
            raw, raw_cpu = baseline(redis_url, n, scope)
            pg_profile.phase_start(db_url)  # no-op unless under bench/pg_profile.py
            spies = []
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                spies = [
                    py_spy(
                        procs[0].pid,
                        args.profile / "worker.txt",
                        subprocesses=True,
                        idle=args.profile_idle,
                    ),
                    py_spy(
                        procs[1].pid,
                        args.profile / "intake.txt",
                        subprocesses=False,
                        idle=args.profile_idle,
                    ),
                ]
                time.sleep(1)  # py-spy attaches
            calls, counts = redis_calls(redis_url), pg_counts(engine)
            path, path_cpu = whole_path(engine, redis_url, [a.id for a in created], n, scope)
            # Read right away (the stats lag by up to a second; the bench's own polling
            # counts too: about one commit per 20 ms).
            time.sleep(1)
            print(f"Redis calls per whole-path job: {per_job(calls, redis_calls(redis_url), n)}")
            print(f"PostgreSQL per whole-path job: {per_job(counts, pg_counts(engine), n)}")
            pg_profile.phase_end(db_url)
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            api_url = f"http://127.0.0.1:{api_port}"
            # Warm up first (discarded): the API's first requests open its database pool
            # and reach code paths the whole-path part never ran, 60-230 ms each for the
            # first five; bench/api.py warms its servers up the same way.
            api_latency(api_url, new.api_key, args.rate, 1.0)
            lat = api_latency(api_url, new.api_key, args.rate, min(args.seconds, 30))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:  # a worker stuck in warm shutdown
                    p.kill()
                    p.wait(timeout=30)
            engine.dispose()
    return raw, raw_cpu, path, path_cpu, lat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per measurement (<= 2000)")
    parser.add_argument("--rate", type=float, default=20.0, help="POST /v1/jobs per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="latency run length (<= 30)")
    parser.add_argument("--profile", type=Path, help="write py-spy raw stacks here (a folder)")
    parser.add_argument(
        "--profile-idle", action="store_true", help="profile wall time (py-spy --idle), not CPU"
    )
    parser.add_argument(
        "--accounts", type=int, default=1, help="whole path: jobs spread over this many accounts"
    )
    args = parser.parse_args()
    n = max(10, min(args.jobs, 2000))
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"tollgate-bench-{secrets.token_hex(3)}"
    logs.mkdir(parents=True)
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis_argv = [redis_server_binary(), "--port", str(redis_port), "--bind", "127.0.0.1"]
    redis_argv += ["--save", "", "--appendonly", "no", "--dir", str(logs)]
    redis_proc = spawn(redis_argv, dict(os.environ), logs / "redis.log")
    wait_port(redis_port, READY_TIMEOUT_S)
    try:
        raw, raw_cpu, path, path_cpu, lat = measure(args, n, logs, redis_url)
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=30)
    print(f"jobs per measurement: {n}; worker: 2 prefork processes; logs in {logs}")
    print(f"{'measure':<44}{'value':>12}")
    print(f"{'raw Celery no-op round trips /s':<44}{raw:>12.1f}")
    print(f"{'whole path jobs /s (queue -> commit)':<44}{path:>12.1f}")
    ratio = path / raw
    met = "MET" if ratio >= TARGET_RATIO else "NOT MET"
    print(f"{f'ratio (target >= {TARGET_RATIO})':<44}{ratio:>12.2f}  {met}")
    print(f"CPU per raw round trip: {cpu.describe(raw_cpu)}")
    print(f"CPU per whole-path job: {cpu.describe(path_cpu)}")
    print(f"(the machine has {os.cpu_count()} cores; every process above shares them)")
    if lat:
        q = statistics.quantiles(lat, n=100)
        print(
            f"POST /v1/jobs at {args.rate:g}/s x {args.seconds:g}s: {len(lat)} accepted, "
            f"p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
