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
every loop is bounded in count and time.

Usage: python bench/chaos.py [--jobs 300] [--rate 4] [--settle-s 180] [--seed 1] [--kit DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from bench.bench_env import bench_secrets  # noqa: E402
from bench.ledger import bench_database, libpq_url  # noqa: E402
from billing import ledger  # noqa: E402
from billing.db import make_engine, run_transaction  # noqa: E402
from billing.tables import holds  # noqa: E402
from billing.verify import verify  # noqa: E402
from orchestrator import accounts  # noqa: E402
from orchestrator.ingress.streams import DEAD_STREAM, JOBS_STREAM  # noqa: E402
from orchestrator.jobs.states import TERMINAL  # noqa: E402
from orchestrator.standalone import free_port, redis_server_binary  # noqa: E402
from orchestrator.tables import jobs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get(
    "TOLLGATE_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
GPU_QUEUES = "gpu.txt2img,gpu.post"
# Beat's tasks (reaper, lease sweep, re-publisher) get a worker of their own, as in a
# deployment: behind a GPU worker's render they would expire before they ran.
MAINTENANCE_QUEUES = "tollgate.maintenance,tollgate.callbacks"
READY_TIMEOUT_S = 120
JOBS_MAX = 5000
CHILD_KILL_EVERY_S = 12.0
RICH_CREDITS = 100_000
POOR_CREDITS = 3
PY = sys.executable


def spec(rng: random.Random) -> dict[str, Any]:
    return {
        "type": "txt2img",
        "prompt": f"chaos {rng.randrange(10**6)}",
        "width": 256,
        "height": 256,
        "steps": rng.choice((2, 3, 4)),
        "num_images": rng.choice((1, 1, 2)),
    }


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def wait_log(log: Path, marker: bytes, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while marker not in log.read_bytes():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{log} never said {marker!r}: {log.read_text()[-2000:]}")
        time.sleep(0.1)


def wait_port(port: int, timeout_s: float = 30) -> None:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            client.ping()
            return
        except redis.RedisError:
            time.sleep(0.1)
    raise RuntimeError(f"redis on {port} did not answer")


@dataclass
class Chaos:
    """The fault schedule and what it measured."""

    db_url: str
    api_url: str
    workers: list[Proc]
    intake: Proc
    redis_proc: Proc
    redis_port: int
    keys: dict[str, str]
    rng: random.Random
    log: list[str] = field(default_factory=list)
    # (kill time as wall clock, job ids that the killed worker was running)
    kills: list[tuple[float, list[str]]] = field(default_factory=list)
    http_codes: dict[int, int] = field(default_factory=dict)
    main_kill_jobs: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {text}"
        self.log.append(line)
        print(line, flush=True)

    def running_on(self, worker: Proc) -> list[str]:
        """The job this worker's only pool process runs now (-c 1): its latest start."""
        node = worker.name
        with psycopg.connect(libpq_url(self.db_url), autocommit=True, connect_timeout=5) as c:
            rows = c.execute(
                "SELECT id FROM jobs WHERE status = 'running' AND worker LIKE %s"
                " ORDER BY started_at DESC LIMIT 1",
                (node + "@%",),
            ).fetchall()
        return [r[0] for r in rows]

    def kill_child(self) -> None:
        worker = self.rng.choice(self.workers)
        kids = children_of(worker.pid)
        if not kids:
            return
        running = self._try(lambda: self.running_on(worker), [])
        os.kill(kids[0], signal.SIGKILL)
        self.kills.append((time.time(), running))
        self.note(f"SIGKILL {worker.name} pool child {kids[0]} (running {running})")

    def kill_worker_main(self) -> None:
        worker = self.workers[0]
        kids = children_of(worker.pid)
        running = self._try(lambda: self.running_on(worker), [])
        worker.kill()
        for kid in kids:  # a node loss takes the pool with it
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
        self.kills.append((time.time(), running))
        self.main_kill_jobs.extend(running)
        self.note(f"SIGKILL {worker.name} main process (running {running}); restarting")
        worker.start()

    def kill_intake(self) -> None:
        self.intake.kill()
        self.note("SIGKILL intake; restarting")
        self.intake.start()

    def kill_redis(self) -> None:
        self.redis_proc.kill()
        self.note("SIGKILL redis; restarting in 1 s")
        time.sleep(1.0)
        self.redis_proc.start()
        wait_port(self.redis_port)
        self.note("redis back")

    def kill_connections(self) -> None:
        def work() -> int:
            with psycopg.connect(libpq_url(self.db_url), autocommit=True, connect_timeout=5) as c:
                row = c.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()
            return int(row[0]) if row else 0

        self.note(f"pg_terminate_backend: {self._try(work, -1)} connections")

    def cancel_some(self) -> None:
        def pick() -> list[tuple[str, str]]:
            with psycopg.connect(libpq_url(self.db_url), autocommit=True, connect_timeout=5) as c:
                return c.execute(
                    "SELECT id, account_id FROM jobs WHERE status IN"
                    " ('queued', 'dispatched', 'running') ORDER BY random() LIMIT 2"
                ).fetchall()

        for job_id, account in self._try(pick, []):
            code = self.http("POST", f"/v1/jobs/{job_id}/cancel", account)
            self.note(f"cancel {job_id}: HTTP {code}")

    def http(self, method: str, path: str, account: str) -> int:
        headers = {"Authorization": f"Bearer {self.keys[account]}"}
        try:
            code = httpx.request(method, self.api_url + path, headers=headers, timeout=15)
            status = code.status_code
        except httpx.HTTPError:
            status = 0  # the API process itself did not answer
        self.http_codes[status] = self.http_codes.get(status, 0) + 1
        return status

    def _try(self, fn: Any, default: Any) -> Any:
        try:
            return fn()
        except Exception as exc:  # a fault of our own making (redis restarting, ...)
            self.note(f"  ({fn.__name__ if hasattr(fn, '__name__') else 'step'} failed: {exc})")
            return default

    def schedule(self, window_s: float) -> list[tuple[float, str]]:
        events: list[tuple[float, str]] = []
        t = 6.0
        while t < window_s:
            events.append((t + self.rng.uniform(-2, 2), "kill_child"))
            t += CHILD_KILL_EVERY_S
        events.append((window_s * 0.45, "kill_worker_main"))
        events.append((window_s * 0.25, "kill_intake"))
        events.append((window_s * 0.6, "kill_redis"))
        for _ in range(self.rng.randint(4, 6)):
            events.append((self.rng.uniform(3, window_s), "kill_connections"))
        for frac in (0.3, 0.5, 0.8):
            events.append((window_s * frac, "cancel_some"))
        return sorted(events)

    def run(self, window_s: float, stop: threading.Event) -> None:
        for at, action in self.schedule(window_s):
            delay = self.started + at - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            getattr(self, action)()


def feed(
    redis_port: int,
    db: int,
    owners: list[str],
    poor: str,
    n: int,
    rate: float,
    rng: random.Random,
    chaos: Chaos,
) -> dict[str, int]:
    """XADD n messages at `rate`/s: valid jobs, a few duplicates (the same message twice) and
    malformed ones. Redis restarts are ridden out (bounded retries per message)."""
    client = redis.Redis(host="127.0.0.1", port=redis_port, db=db, socket_timeout=5)
    sent = {"valid": 0, "duplicate": 0, "malformed": 0, "lost": 0}
    previous: str | None = None
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        roll = rng.random()
        if roll < 0.04:
            text, kind = rng.choice(('{"account_id": ', '{"spec": {}}', "[]")), "malformed"
        elif roll < 0.08 and previous is not None:
            text, kind = previous, "duplicate"
        else:
            account = poor if rng.random() < 0.15 else rng.choice(owners)
            text = json.dumps(
                {"account_id": account, "idempotency_key": f"chaos-{i}", "spec": spec(rng)}
            )
            kind, previous = "valid", text
        for _attempt in range(60):
            try:
                client.xadd(JOBS_STREAM, {"job": text})
                sent[kind] += 1
                break
            except redis.RedisError:
                time.sleep(0.5)
        else:
            sent["lost"] += 1
            chaos.note(f"message {i} could not be sent")
    return sent


def count_terminal(engine: Any) -> tuple[int, int]:
    def work(c: Any) -> tuple[int, int]:
        total = c.execute(select(func.count()).select_from(jobs)).scalar_one()
        done = c.execute(
            select(func.count()).select_from(jobs).where(jobs.c.status.in_(sorted(TERMINAL)))
        ).scalar_one()
        return int(total), int(done)

    return run_transaction(engine, work)


def drift(engine: Any, granted: dict[str, int]) -> tuple[int, list[str]]:
    """Credits unaccounted for: per account, granted - available - held must equal the sum
    charged on its jobs; a terminal job must hold nothing."""

    def work(c: Any) -> tuple[int, list[str]]:
        total, notes = 0, []
        for account, amount in granted.items():
            bal = ledger.get_balance(c, account, "image")
            charged = c.execute(
                select(func.coalesce(func.sum(jobs.c.charged), 0)).where(
                    jobs.c.account_id == account
                )
            ).scalar_one()
            off = amount - bal.available - bal.held - int(charged)
            if off:
                notes.append(f"{account}: {off:+d}")
            total += abs(off)
        open_on_terminal = c.execute(
            select(func.count())
            .select_from(holds.join(jobs, jobs.c.id == holds.c.reference))
            .where(holds.c.status == "open", jobs.c.status.in_(sorted(TERMINAL)))
        ).scalar_one()
        if open_on_terminal:
            notes.append(f"{open_on_terminal} open hold(s) on ended jobs")
            total += int(open_on_terminal)
        return total, notes

    return run_transaction(engine, work)


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> int:  # noqa: PLR0915 (one linear script)
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
    (work / "redis").mkdir()
    redis_proc = Proc(
        "redis",
        [
            redis_server_binary(),
            "--port", str(redis_port),
            "--bind", "127.0.0.1",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--dir", str(work / "redis"),
        ],
        work / "redis.log",
        base_env,
    )  # fmt: skip
    redis_proc.start()
    wait_port(redis_port)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    with bench_database(None, ADMIN_URL) as db_url:
        env = {
            **base_env,
            "TOLLGATE_DATABASE_URL": db_url,
            **bench_secrets(),
            "TOLLGATE_REDIS_URL": redis_url,
            "TOLLGATE_STORAGE_URL": str(work / "storage"),
            "TOLLGATE_MODELS": str(kit / "models.toml"),
            "TOLLGATE_WORKER_MODELS": "sd15",
            "TOLLGATE_DEVICE": "cpu",
            "TOLLGATE_WORK_DIR": str(work / "work"),
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith("TOLLGATE_")})
        engine = make_engine(db_url)
        owners: list[str] = []
        keys: dict[str, str] = {}
        granted: dict[str, int] = {}
        for i in range(4):
            made = accounts.create_account(engine, f"chaos-{i}", "business")
            amount = POOR_CREDITS if i == 3 else RICH_CREDITS

            def give(c: Any, a: str = made.id, amount: int = amount) -> Any:
                return ledger.grant(
                    c, a, "image", amount, source="adjustment", reference=f"chaos-{a}"
                )

            run_transaction(engine, give)
            keys[made.id], granted[made.id] = made.api_key, amount
            owners.append(made.id)
        poor = owners.pop()
        api_port = free_port()

        def celery(name: str, queues: str = GPU_QUEUES) -> Proc:
            argv = [PY, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues, "-c", "1",
                    "-P", "prefork", "-n", f"{name}@%h", "--without-mingle", "--without-gossip",
                    "-l", "info"]  # fmt: skip
            return Proc(name, argv, work / f"{name}.log", env)

        workers = [celery("chaos1"), celery("chaos2")]
        intake = Proc(
            "intake",
            [PY, "-m", "orchestrator", "intake", "--claim-min-idle-ms", "10000"],
            work / "intake.log",
            env,
        )
        api = Proc(
            "api",
            [PY, "-m", "orchestrator", "api", "--port", str(api_port)],
            work / "api.log",
            env,
        )
        beat = Proc(
            "beat",
            [PY, "-m", "celery", "-A", "workers.app", "beat", "-l", "info",
             "--schedule", str(work / "celerybeat-schedule")],
            work / "beat.log",
            env,
        )  # fmt: skip
        maintenance = celery("chaos-maint", MAINTENANCE_QUEUES)
        procs = [api, intake, *workers, maintenance, beat]
        for p in procs:
            p.start()
        stop = threading.Event()
        try:
            wait_log(api.log, b"Uvicorn running")
            for w in workers:
                wait_log(w.log, b"ready.")
            chaos = Chaos(
                db_url, f"http://127.0.0.1:{api_port}", workers, intake, redis_proc,
                redis_port, keys, rng,
            )  # fmt: skip
            feed_s = n / rate
            window_s = max(feed_s + 15, 50.0)
            faults = threading.Thread(target=chaos.run, args=(window_s, stop), daemon=True)
            faults.start()
            sent = feed(redis_port, 0, owners, poor, n, rate, rng, chaos)
            chaos.note(f"sent {sent}")
            faults.join(timeout=window_s + 120)
            chaos.note("fault schedule over; waiting for the jobs to end")
            # Wait until the stream is drained and every job has ended (bounded).
            deadline = time.monotonic() + args.settle_s
            client = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=5)
            while time.monotonic() < deadline:
                total, done = count_terminal(engine)
                backlog = client.xlen(JOBS_STREAM)
                if backlog == 0 and total == done:
                    break
                time.sleep(1.0)
            for _ in range(20):  # a few API reads after the storm, for the 5xx count
                chaos.http("GET", "/v1/jobs?limit=5", owners[0])
        finally:
            stop.set()
            for p in reversed(procs):
                p.stop()

        # -- report --
        def rows(c: Any) -> list[Any]:
            cols = (jobs.c.id, jobs.c.status, jobs.c.worker, jobs.c.finished_at, jobs.c.attempt)
            return list(c.execute(select(*cols)).all())

        all_rows = run_transaction(engine, rows)
        client = redis.Redis(host="127.0.0.1", port=redis_port, decode_responses=True)
        dead: Any = client.xrange(DEAD_STREAM)
        dead_kinds: dict[str, int] = {}
        for _mid, fields in dead:
            dead_kinds[fields.get("kind", "?")] = dead_kinds.get(fields.get("kind", "?"), 0) + 1
        rejected = [r for r in all_rows if r.status == "rejected"]
        accepted = [r for r in all_rows if r.status != "rejected"]
        stuck = [r for r in accepted if r.status not in TERMINAL]
        by_status: dict[str, int] = {}
        for r in all_rows:
            by_status[r.status] = by_status.get(r.status, 0) + 1
        drifted, drift_notes = drift(engine, granted)
        problems = run_transaction(engine, verify)
        finished = {r.id: r.finished_at for r in all_rows}
        recoveries = [
            finished[j].timestamp() - at
            for at, ids in chaos.kills
            for j in ids
            if finished.get(j) is not None
        ]
        unrecovered = sorted({j for _, ids in chaos.kills for j in ids if finished.get(j) is None})
        errors_5xx = {c: k for c, k in chaos.http_codes.items() if c >= 500 and c != 503 or c == 0}
        engine.dispose()
    redis_proc.stop()
    print()
    print(f"messages sent: {sent}")
    print(f"jobs accepted: {len(accepted)}; rejected rows: {len(rejected)}; by status: {by_status}")
    print(f"dead letters: {len(dead)} {dead_kinds} (insufficient_credits rows must match)")
    print(f"jobs terminal: {len(accepted) - len(stuck)}; stuck: {len(stuck)}")
    for r in stuck:
        cause = " (its worker's main process was killed)" if r.id in chaos.main_kill_jobs else ""
        print(f"  stuck {r.id}: {r.status} on {r.worker} (attempt {r.attempt}){cause}")
    print(f"credits drifted: {drifted} {drift_notes}")
    print(f"ledger verify: {problems if problems else 'clean'}")
    print(f"HTTP codes of the API calls: {chaos.http_codes}")
    if recoveries:
        print(
            f"recovery after a worker kill: {len(recoveries)} jobs, "
            f"p50 {percentile(recoveries, 50):.1f} s, p99 {percentile(recoveries, 99):.1f} s"
        )
    if unrecovered:
        print(f"jobs a killed worker was running that never ended: {unrecovered}")
    print(f"logs in {work}")
    rejected_dead = dead_kinds.get("insufficient_credits", 0)
    duplicate_rejections = len(rejected) - rejected_dead
    if duplicate_rejections > 0:
        print(f"rejections recorded more than once: {duplicate_rejections}")
    failed = bool(stuck or drifted or problems or errors_5xx or duplicate_rejections > 0)
    print("RESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
