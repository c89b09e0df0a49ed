"""Chaos soak: jobs flow through every process while they are killed and their services cut.

Own redis-server (AOF, fsync always) on a free port, a fresh PostgreSQL database, the tiny
model kit (`tollgate models make-tiny`), and as separate processes: the API, the intake, two
GPU-queue Celery workers (`-c 1`), one for beat's maintenance queue, and beat. N jobs
(default 300) from four accounts go onto `tollgate:jobs` (one account is short of credits;
a few exact duplicates and malformed messages), while the fault schedule runs: SIGKILL of
a worker pool child every ~12 s, once of a worker main process (restarted), SIGKILL +
restart of the intake, SIGKILL + restart of Redis, pg_terminate_backend of every
connection 4-6 times, a few cancels over HTTP.

It prints jobs accepted, terminal and stuck, credits drifted, `ledger verify`, API 5xx other
than 503, and the recovery time (p50/p99) of the jobs a killed worker was running. Exit
status 1 on any stuck job, drift, verify problem or 500. Everything listens on 127.0.0.1;
every loop is bounded in count and time. The parts live in bench/soak/ (processes, stack,
faults, load, audit, report).

Usage: python bench/chaos.py [--jobs 300] [--rate 4] [--settle-s 180] [--seed 1] [--kit DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_env import bench_secrets  # noqa: E402
from bench.ledger import bench_database  # noqa: E402
from bench.soak import audit, report, stack  # noqa: E402
from bench.soak.faults import Chaos  # noqa: E402
from bench.soak.load import feed  # noqa: E402
from bench.soak.processes import ROOT, wait_port  # noqa: E402
from billing.db import make_engine  # noqa: E402
from orchestrator.standalone import free_port  # noqa: E402

ADMIN_URL = os.environ.get(
    "TOLLGATE_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
JOBS_MAX = 5000
PY = sys.executable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300, help=f"messages to send (<= {JOBS_MAX})")
    parser.add_argument("--rate", type=float, default=4.0, help="messages per second")
    parser.add_argument("--settle-s", type=float, default=180.0, help="wait for the last jobs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kit", type=Path, default=None, help="tiny kit folder (reused)")
    args = parser.parse_args()
    n = max(20, min(args.jobs, JOBS_MAX))
    rate = max(0.5, min(args.rate, 50.0))
    rng = random.Random(args.seed)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"tollgate-chaos-{secrets.token_hex(3)}"
    work.mkdir(parents=True)
    kit = args.kit or Path(os.environ.get("TMPDIR", "/tmp")) / "tollgate-chaos-kit"
    print(f"work dir {work}; tiny kit {kit}", flush=True)
    base_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # two workers share the cores; torch must not oversubscribe
    }
    subprocess.run(
        [PY, "-m", "orchestrator", "models", "make-tiny", str(kit), "--no-sdxl", "--no-gfpgan"],
        env=base_env,
        cwd=ROOT,
        check=True,
        timeout=900,
    )
    redis_port = free_port()
    redis_proc = stack.redis_server(work, redis_port, base_env)
    redis_proc.start()
    wait_port(redis_port)
    with bench_database(None, ADMIN_URL) as db_url:
        env = {
            **base_env,
            "TOLLGATE_DATABASE_URL": db_url,
            **bench_secrets(),
            "TOLLGATE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "TOLLGATE_STORAGE_URL": str(work / "storage"),
            "TOLLGATE_MODELS": str(kit / "models.toml"),
            "TOLLGATE_WORKER_MODELS": "sd15",
            "TOLLGATE_DEVICE": "cpu",
            "TOLLGATE_WORK_DIR": str(work / "work"),
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith("TOLLGATE_")})
        engine = make_engine(db_url)
        made = stack.make_accounts(engine)
        system = stack.tollgate(work, env, free_port())
        system.start()
        stop = threading.Event()
        try:
            system.wait_ready()
            chaos = Chaos(
                db_url, f"http://127.0.0.1:{system.api_port}", system.workers, system.intake,
                redis_proc, redis_port, made.keys, rng,
            )  # fmt: skip
            window_s = max(n / rate + 15, 50.0)
            faults = threading.Thread(target=chaos.run, args=(window_s, stop), daemon=True)
            faults.start()
            sent = feed(redis_port, 0, made.owners, made.poor, n, rate, rng, chaos)
            chaos.note(f"sent {sent}")
            faults.join(timeout=window_s + 120)
            chaos.note("fault schedule over; waiting for the jobs to end")
            audit.wait_settled(engine, redis_port, args.settle_s)
            for _ in range(20):  # a few API reads after the storm, for the 5xx count
                chaos.http("GET", "/v1/jobs?limit=5", made.owners[0])
        finally:
            stop.set()
            system.stop()
        outcome = report.gather(engine, redis_port, chaos, made.granted)
        engine.dispose()
    redis_proc.stop()
    failed = report.show(outcome, sent, chaos, work)
    print("RESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
