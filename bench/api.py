"""Benchmark: one `tollgate api` process against a baseline endpoint of the same shape, in
the same run, on the same PostgreSQL server, driven by the same load generator (wrk).

1. Capacity of `POST /v1/jobs`: requests/s with wrk (4 connections), Tollgate / baseline.
   Target >= 0.5. The baseline (bench/api_baseline.py) is FastAPI + uvicorn + pydantic +
   psycopg 3 with a bearer-token check, one durable INSERT ... RETURNING and a 202 answer.
   Also the CPU ms per request of each server process and of its PostgreSQL backends
   (read from /proc: less noisy than req/s on a shared box).
2. Capacity of `GET /v1/jobs/{id}` against a baseline single-row SELECT. Target >= 0.5.
3. Latency of `POST /v1/jobs` at a fixed rate (open loop, default 100 req/s) while a Celery
   worker on the same box runs the submitted jobs. Target p99 <= 25 ms. The generator is
   this process: asyncio over a bounded pool of keep-alive connections, the request bytes
   built once, each latency from the request's scheduled send time (waiting for a free
   connection or in the server's queue counts). Measured for one API process, then (as a
   separate, labelled figure) for `tollgate api --workers N` (`--p99-workers`, default 2);
   the CPU per request of each process group (API, worker, PostgreSQL, the generator) is
   printed with it. It starts once the worker has run the jobs the capacity runs left
   (thousands: it would otherwise be draining them, in fair order ahead of the generator's
   own jobs) and after a VACUUM ANALYZE: this server runs with autovacuum off, and a
   deployment's would have cleaned up after those jobs by then.

Both servers are one uvicorn process with the same log level and the same uvicorn stack
(uvloop + httptools when installed: both pick them). Needs `wrk` (Debian).
Usage: python bench/api.py [--seconds 8] [--connections 4] [--rate 100] [--rate-seconds 10]
       [--p99-workers 2] [--profile FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
from sqlalchemy import Engine, func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import cpu, pg_profile  # noqa: E402
from bench.bench_env import bench_secrets, funded_accounts  # noqa: E402
from bench.cpu import CLOCK_TICKS_PER_S  # noqa: E402
from bench.ledger import bench_database, libpq_url  # noqa: E402
from bench.lifecycle import ADMIN_URL, spawn, wait_log  # noqa: E402
from bench.open_loop import BODY, OPEN_LOOP_CONNECTIONS, open_loop  # noqa: E402
from billing.db import make_engine, run_transaction  # noqa: E402
from orchestrator.jobs.states import TERMINAL  # noqa: E402
from orchestrator.scheduling.dispatch import Publisher  # noqa: E402
from orchestrator.scheduling.scheduler import nudge  # noqa: E402
from orchestrator.standalone import free_port  # noqa: E402
from orchestrator.tables import jobs  # noqa: E402

SECONDS_MAX = 30
DRAIN_TIMEOUT_S = 300  # the capacity runs' backlog, run by the worker before the p99 part
RATE_MAX = 500
JSON = {"Content-Type": "application/json"}
BASELINE_APP = "tollgate-bench-baseline"  # the baseline's PostgreSQL application_name
WORKER_QUEUES = "gpu.txt2img,gpu.post,tollgate.maintenance,tollgate.callbacks,celery"


@dataclass(frozen=True)
class Run:
    """One wrk run: answered requests per second, and CPU per request (ms) of the server
    process and of its PostgreSQL backends (read from /proc, so other load does not count)."""

    per_s: float
    server_ms: float
    postgres_ms: float


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def backends(db_url: str, baseline: bool) -> list[int]:
    """The PostgreSQL backend pids of one server (the baseline names itself)."""
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'"
        ).fetchall()
    return [pid for pid, name in rows if (name == BASELINE_APP) == baseline]


def wrk(
    url: str, api_key: str | list[str], seconds: int, connections: int, post: bool, server: Server
) -> Run:
    """A wrk run against one server; raises if any answer was not 2xx. Several keys: each
    request takes the next (its own account)."""
    script = Path(tempfile.mkdtemp()) / "req.lua"
    method = "POST" if post else "GET"
    keys = [api_key] if isinstance(api_key, str) else api_key
    script.write_text(
        f'wrk.method = "{method}"\n'
        f"wrk.body = {('[[' + BODY + ']]') if post else 'nil'}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {keys[0]}"\n'
        + (
            ""
            if len(keys) == 1
            else "keys = {" + ", ".join(f'"{k}"' for k in keys) + "}\n"
            "n = 0\n"
            "request = function()\n"
            "  n = n + 1\n"
            '  wrk.headers["Authorization"] = "Bearer " .. keys[n % #keys + 1]\n'
            "  return wrk.format()\n"
            "end\n"
        )
    )
    pg_before = {pid: cpu_s(pid) for pid in backends(server.db_url, server.baseline)}
    own_before = cpu_s(server.pid)
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(min(2, connections)),
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    own = cpu_s(server.pid) - own_before
    pg = sum(cpu_s(p) - pg_before.get(p, 0.0) for p in backends(server.db_url, server.baseline))
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw non-2xx answers from {url}:\n{out}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if found is None or total is None or int(total.group(1)) == 0:
        raise RuntimeError(f"no requests in wrk output:\n{out}")
    n = int(total.group(1))
    return Run(float(found.group(1)), 1000 * own / n, 1000 * pg / n)


@dataclass(frozen=True)
class Server:
    pid: int
    db_url: str
    baseline: bool


def unfinished(engine: Engine) -> int:
    return int(
        run_transaction(
            engine,
            lambda c: c.execute(
                select(func.count()).select_from(jobs).where(jobs.c.status.not_in(TERMINAL))
            ).scalar_one(),
        )
    )


def wait_drained(engine: Engine, redis_url: str, timeout_s: float) -> tuple[int, float]:
    """Until no job is left to run (queued, dispatched or running): how many there were,
    and how long the worker took. Each poll runs a dispatch pass, as beat's periodic
    dispatcher would (none runs here: the jobs were queued before the worker's slots were
    announced, and only a pass sends them). Raises past `timeout_s`."""
    publish = Publisher(redis_url)
    start, left = time.monotonic(), unfinished(engine)
    first = left
    while left:
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"the worker left {left} of {first} jobs after {timeout_s:.0f} s")
        nudge(engine, publish)
        time.sleep(0.5)
        left = unfinished(engine)
    return first, time.monotonic() - start


def vacuum(db_url: str) -> None:
    """VACUUM ANALYZE the bench database: the shared server runs with autovacuum off, and a
    deployment's autovacuum would have cleaned up after thousands of jobs by now (the hot
    queue, flow and balance rows otherwise carry every dead version the runs left)."""
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")


def backend_cpu(db_url: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend of the bench database (both servers',
    the worker's)."""
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        pids = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        ).fetchall()
    return {pid: cpu_s(pid) for (pid,) in pids}


def phase_ms(
    before: Counter[str], pg_before: dict[int, float], scope: cpu.Scope, db_url: str, n: int
) -> dict[str, float]:
    """CPU ms per request of each process group, and of the database's backends."""
    ms = cpu.per_job_ms(before, cpu.snapshot(scope), n)
    pg_s = sum(s - pg_before.get(pid, 0.0) for pid, s in backend_cpu(db_url).items())
    ms["postgres backends"] = 1000 * pg_s / n
    return dict(sorted(ms.items(), key=lambda kv: -kv[1]))


def wait_started(log: Path, processes: int, timeout_s: float = 120.0) -> None:
    """Until each of uvicorn's worker processes has logged its startup."""
    deadline = time.monotonic() + timeout_s
    while log.read_bytes().count(b"Application startup complete") < processes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{log}: {processes} processes never started")
        time.sleep(0.2)


def _stack() -> str:
    """What uvicorn picks here (`loop="auto"`, `http="auto"`) for both servers."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn with {loop} + {http} (both servers)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8, help="wrk run length (<= 30)")
    parser.add_argument("--connections", type=int, default=4, help="wrk connections (<= 64)")
    parser.add_argument("--rate", type=float, default=100.0, help="open-loop req/s (<= 500)")
    parser.add_argument("--rate-seconds", type=float, default=10.0, help="open-loop length")
    parser.add_argument(
        "--accounts",
        type=int,
        default=1,
        help="POST capacity: requests spread over this many accounts, one key each (<= 64)",
    )
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument(
        "--profile",
        type=Path,
        help="write py-spy collapsed stacks (GIL holder only) of the POST run here",
    )
    parser.add_argument(
        "--p99-workers",
        type=int,
        default=2,
        help="also measure the open-loop p99 with `tollgate api --workers N` (0: skip)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/api.py needs wrk: apt-get install wrk")
    seconds = max(2, min(args.seconds, SECONDS_MAX))
    connections = max(1, min(args.connections, 64))
    rate = max(1.0, min(args.rate, RATE_MAX))
    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"tollgate-bench-api-{secrets.token_hex(3)}"
    logs.mkdir(parents=True)
    with bench_database(None, ADMIN_URL) as db_url:
        import redis

        redis.Redis.from_url(redis_url).flushdb()
        n_accounts = max(1, min(args.accounts, 64))
        baseline_keys = [secrets.token_urlsafe(24) for _ in range(n_accounts)]
        baseline_key = baseline_keys[0]
        env = {
            **os.environ,
            "TOLLGATE_DATABASE_URL": db_url,
            **bench_secrets(),
            "TOLLGATE_REDIS_URL": redis_url,
            "TOLLGATE_STORAGE_URL": str(logs / "storage"),
            "BASELINE_DATABASE_URL": f"{libpq_url(db_url)}?application_name={BASELINE_APP}",
            "BASELINE_API_KEY": ",".join(baseline_keys),
            "PYTHONUNBUFFERED": "1",
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith("TOLLGATE_")})
        engine = make_engine(db_url)
        created = funded_accounts(engine, n_accounts, 10_000_000)
        new = created[0]
        our_keys = [a.api_key for a in created]
        ours_port, base_port = free_port(), free_port()
        ours_url, base_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{base_port}"
        servers = [
            spawn(
                [sys.executable, "-m", "orchestrator", "api", "--port", str(ours_port)],
                env,
                logs / "api.log",
            ),
            spawn(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "bench.api_baseline:app",
                    "--port",
                    str(base_port),
                    "--log-level",
                    "info",
                ],
                env,
                logs / "baseline.log",
            ),
        ]
        worker: subprocess.Popen[bytes] | None = None
        try:
            wait_log(logs / "api.log", b"Uvicorn running")
            wait_log(logs / "baseline.log", b"Uvicorn running")
            auth = {"Authorization": f"Bearer {new.api_key}", "Content-Type": "application/json"}
            first = httpx.post(f"{ours_url}/v1/jobs", content=BODY, headers=auth)
            if first.status_code != 202:
                raise RuntimeError(f"POST /v1/jobs answered {first.status_code}: {first.text}")
            ours_job = first.json()["id"]
            base_job = httpx.post(
                f"{base_url}/v1/jobs",
                content=BODY,
                headers={"Authorization": f"Bearer {baseline_key}", **JSON},
            ).json()["id"]
            ours = Server(servers[0].pid, db_url, baseline=False)
            base = Server(servers[1].pid, db_url, baseline=True)
            # Warm both up, then measure alternately: baseline, Tollgate.
            wrk(f"{base_url}/v1/jobs", baseline_keys, 2, connections, True, base)
            wrk(f"{ours_url}/v1/jobs", our_keys, 2, connections, True, ours)
            base_post = wrk(f"{base_url}/v1/jobs", baseline_keys, seconds, connections, True, base)
            pg_profile.phase_start(db_url)  # no-op unless under bench/pg_profile.py
            spy = None
            if args.profile:
                spy = subprocess.Popen(
                    [
                        str(Path(sys.executable).with_name("py-spy")),
                        "record",
                        "-p",
                        str(servers[0].pid),
                        "-d",
                        str(seconds),
                        "-f",
                        "raw",
                        "-o",
                        str(args.profile),
                        "-r",
                        "200",
                        "--gil",  # only the thread holding the GIL: CPU, not waits
                    ],
                    stdout=subprocess.DEVNULL,
                )
            ours_post = wrk(f"{ours_url}/v1/jobs", our_keys, seconds, connections, True, ours)
            pg_profile.phase_end(db_url)
            if spy is not None:
                spy.wait(timeout=60)
            base_get = wrk(
                f"{base_url}/v1/jobs/{base_job}", baseline_key, seconds, connections, False, base
            )
            ours_get = wrk(
                f"{ours_url}/v1/jobs/{ours_job}", new.api_key, seconds, connections, False, ours
            )
            worker = spawn(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "bench.noop_app",
                    "worker",
                    "-Q",
                    WORKER_QUEUES,
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
            )
            # The capacity runs left thousands of jobs queued: measure once the worker has
            # run them (it then runs the generator's own jobs), not while it drains them.
            drained, drain_s = wait_drained(engine, redis_url, DRAIN_TIMEOUT_S)
            vacuum(db_url)
            rate_s = min(args.rate_seconds, SECONDS_MAX)
            # This process's tree by group; the bench database's backends per pid (a group's
            # sum would lose a backend that closes during the run, and what it had spent).
            scope = cpu.Scope(os.getpid())
            before, pg_before = cpu.snapshot(scope), backend_cpu(db_url)
            lat = open_loop(ours_url, new.api_key, rate, rate_s)
            spent = {
                "one process": phase_ms(before, pg_before, scope, db_url, lat.accepted),
            }
            lat_multi = None
            multi_error = ""
            if args.p99_workers > 1:  # the same, with N API processes on one port
                try:
                    servers[0].terminate()
                    servers[0].wait(timeout=30)
                    multi_port = free_port()
                    multi_url = f"http://127.0.0.1:{multi_port}"
                    servers.append(
                        spawn(
                            [
                                *(sys.executable, "-m", "orchestrator", "api"),
                                *("--port", str(multi_port), "--workers", str(args.p99_workers)),
                            ],
                            env,
                            logs / "api-workers.log",
                        )
                    )
                    wait_started(logs / "api-workers.log", args.p99_workers)
                    open_loop(multi_url, new.api_key, rate, 2)  # warm each process's pool
                    time.sleep(3)
                    before, pg_before = cpu.snapshot(scope), backend_cpu(db_url)
                    lat_multi = open_loop(multi_url, new.api_key, rate, rate_s)
                    spent[f"--workers {args.p99_workers}"] = phase_ms(
                        before, pg_before, scope, db_url, lat_multi.accepted
                    )
                except Exception as exc:  # keep the figures measured so far
                    multi_error = f"--workers {args.p99_workers}: {exc!r}"
        finally:
            for p in [*servers, *([worker] if worker else [])]:
                p.terminate()
            for p in [*servers, *([worker] if worker else [])]:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            engine.dispose()
    print(f"one uvicorn process each; wrk {connections} connections x {seconds}s; logs {logs}")
    print(f"{'measure':<44}{'tollgate':>10}{'baseline':>10}{'ratio':>8}  target")
    for name, ours_run, base_run in (
        ("POST /v1/jobs", ours_post, base_post),
        ("GET /v1/jobs/{id}", ours_get, base_get),
    ):
        ratio = ours_run.per_s / base_run.per_s
        verdict = "MET" if ratio >= 0.5 else "NOT MET"
        print(
            f"{name + ' req/s':<44}{ours_run.per_s:>10.0f}{base_run.per_s:>10.0f}{ratio:>8.2f}"
            f"  >= 0.5 {verdict}"
        )
        for what, ours_ms, base_ms in (
            ("server CPU ms/request", ours_run.server_ms, base_run.server_ms),
            ("PostgreSQL CPU ms/request", ours_run.postgres_ms, base_run.postgres_ms),
        ):
            print(
                f"{'  ' + what:<44}{ours_ms:>10.2f}{base_ms:>10.2f}"
                f"{(base_ms / ours_ms if ours_ms else 0):>8.2f}"
            )
    print(
        f"before the p99 part the worker ran the {drained} jobs left, in {drain_s:.0f} s;"
        " then VACUUM ANALYZE (autovacuum is off on this server)"
    )
    runs = [("one process", lat)]
    if lat_multi is not None:
        runs.append((f"--workers {args.p99_workers}", lat_multi))
    for label, one in runs:
        print(
            f"POST /v1/jobs at {rate:g}/s, worker busy, {label}: {one.accepted} accepted,"
            f" p50 {one.p50_ms:.1f} ms, p99 {one.p99_ms:.1f} ms"
            f"  (target p99 <= 25 ms: {'MET' if one.p99_ms <= 25 else 'NOT MET'});"
            f" generator CPU {one.client_cpu_ms:.2f} ms/request"
        )
        print(f"  CPU ms per request by process group: {cpu.describe(spent[label])}")
    print(
        "  (api: `tollgate api`'s parent process; other: its uvicorn worker processes with"
        " --workers, and the idle baseline server)"
    )
    if multi_error:
        print(f"not measured: {multi_error}")
    print(
        f"server stack: {_stack()}; open-loop generator: asyncio, {OPEN_LOOP_CONNECTIONS}"
        " keep-alive connections, latency from each request's scheduled send time"
    )
    print(f"(the machine has {os.cpu_count()} cores; servers, worker, wrk, PostgreSQL share them)")


if __name__ == "__main__":
    main()
