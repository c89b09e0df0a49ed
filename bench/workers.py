"""Benchmark: each job family through the product worker versus a direct ModelManager call.

For every family on the tiny model kit (txt2img 256x256, 4 steps, 4 images; upscale x2 and
x4 on a 128 px photo; face_enhance on scikit-image's astronaut at 256 px; remove_background
on the same photo), in one run:

* direct: the same ModelManager function in this process, model warm, same inputs (the
  decoded input image, the same seeds);
* via worker: jobs.submit -> outbox relay -> the product Celery worker
  (`celery -A workers.app worker -Q gpu.txt2img,gpu.post -c 1`, TOLLGATE_DEVICE=cpu) ->
  job terminal in PostgreSQL. Wall time per job from submit to settled: pricing, hold,
  input storage, dispatch, the run, PNG encoding, output storage, settle.

One warm-up per family on each side, then N measured jobs, direct and worker alternating so
a noisy neighbour hits both alike. The median per job is reported; ratio = worker / direct,
target <= 1.1. Then the worker's Prometheus metrics give the loads per model over its
lifetime (at least 20 consecutive jobs; target 1: every model loaded once).

Usage: python bench/workers.py [--jobs 5] [--kit DIR] [--redis-db 13]
Without --kit the tiny kit is built into a temporary folder (15-50 s) and removed after.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import Engine, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_env import bench_secrets  # noqa: E402
from bench.ledger import bench_database  # noqa: E402
from bench.lifecycle import ADMIN_URL, spawn, wait_log  # noqa: E402
from billing import ledger  # noqa: E402
from billing.db import make_engine, run_transaction  # noqa: E402
from orchestrator import accounts  # noqa: E402
from orchestrator.events import EVENTS_STREAM  # noqa: E402
from orchestrator.jobs import service as jobs  # noqa: E402
from orchestrator.jobs.states import SUCCEEDED, TERMINAL  # noqa: E402
from orchestrator.scheduling.dispatch import Publisher  # noqa: E402
from orchestrator.scheduling.outbox import relay  # noqa: E402
from orchestrator.standalone import free_port  # noqa: E402
from orchestrator.storage import Storage  # noqa: E402
from orchestrator.tables import jobs as jobs_table  # noqa: E402

TARGET_RATIO = 1.1
TARGET_LOADS = 1
LOAD_JOBS_MIN = 20
JOBS_MAX = 50
JOB_TIMEOUT_S = 300
PROMPT = "a lighthouse on a cliff at dusk"
TXT2IMG = {"width": 256, "height": 256, "steps": 4, "num_images": 4, "guidance": 7.5}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quiet() -> None:
    """No progress bars or library warnings from this process's direct calls."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def photo(size: int) -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


def decode(png: bytes) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    image.load()
    return image


@dataclass
class Family:
    name: str
    spec: Callable[[int], dict[str, Any]]  # job number -> job spec
    direct: Callable[[Any, int], Any]  # (manager, job number) -> same work, in process
    direct_s: list[float] = field(default_factory=list)
    worker_s: list[float] = field(default_factory=list)
    submit_s: list[float] = field(default_factory=list)  # jobs.submit + relay, in the caller
    task_s: float = 0.0  # mean task run time inside the worker (its duration histogram)


def families() -> list[Family]:
    small, face = photo(128), photo(256)
    small_b64, face_b64 = base64.b64encode(small).decode(), base64.b64encode(face).decode()
    small_img, face_img = decode(small), decode(face)
    n = TXT2IMG["num_images"]

    def txt2img_spec(i: int) -> dict[str, Any]:
        return {"type": "txt2img", "prompt": PROMPT, "seed": 1000 + 10 * i, **TXT2IMG}

    def txt2img_direct(mm: Any, i: int) -> Any:
        seed = 1000 + 10 * i
        return mm.txt2img(
            "sd15",
            PROMPT,
            None,
            width=TXT2IMG["width"],
            height=TXT2IMG["height"],
            steps=TXT2IMG["steps"],
            guidance=TXT2IMG["guidance"],
            seeds=[seed + k for k in range(n)],
        )

    return [
        Family("txt2img", txt2img_spec, txt2img_direct),
        Family(
            "upscale x2",
            lambda i: {"type": "upscale", "scale": 2, "image_b64": small_b64},
            lambda mm, i: mm.upscale("realesrgan-x2plus", small_img),
        ),
        Family(
            "upscale x4",
            lambda i: {"type": "upscale", "scale": 4, "image_b64": small_b64},
            lambda mm, i: mm.upscale("realesrgan-x4plus", small_img),
        ),
        Family(
            "face_enhance",
            lambda i: {"type": "face_enhance", "image_b64": face_b64},
            lambda mm, i: mm.face_enhance("gfpgan-1.4", face_img),
        ),
        Family(
            "remove_background",
            lambda i: {"type": "remove_background", "image_b64": face_b64},
            lambda mm, i: mm.remove_background("u2net", face_img, alpha_matting=None),
        ),
    ]


class Runner:
    """Submits jobs to the worker and times them from submit to settled."""

    def __init__(self, engine: Engine, storage: Storage, redis_url: str, account: str) -> None:
        self.engine, self.storage, self.account = engine, storage, account
        self.publisher = Publisher(redis_url)
        self.redis = redis.Redis.from_url(redis_url)
        self.jobs_run = 0

    def status(self, job_id: str) -> Any:
        stmt = select(jobs_table.c.status, jobs_table.c.error).where(jobs_table.c.id == job_id)
        with self.engine.connect() as conn:
            return conn.execute(stmt).one()

    def run(self, spec: dict[str, Any]) -> tuple[float, float]:
        """(submit to settled, submit + relay) in seconds. The wait blocks on the events
        stream (as a product client would), so waiting costs no CPU that the worker needs."""
        newest = self.redis.xrevrange(EVENTS_STREAM, count=1)
        last = newest[0][0] if newest else b"0-0"
        start = time.perf_counter()
        job_id = jobs.submit(self.engine, self.storage, self.account, spec).job["id"]
        relay(self.engine, self.publisher, job_id=job_id)
        sent = time.perf_counter() - start
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (ended := self._ended(job_id, last)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} ({spec['type']}) never ended")
            last = ended.last
        elapsed = time.perf_counter() - start
        self.jobs_run += 1
        row = self.status(job_id)
        if row.status != SUCCEEDED:
            raise RuntimeError(f"job {job_id} ({spec['type']}) {row.status}: {row.error}")
        return elapsed, sent

    def _ended(self, job_id: str, last: bytes) -> _Wait:
        reply: Any = self.redis.xread({EVENTS_STREAM: last}, count=100, block=1000)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                if (
                    fields.get(b"job_id") == job_id.encode()
                    and fields.get(b"status", b"").decode() in TERMINAL
                ):
                    return _Wait(True, last)
        return _Wait(False, last)


@dataclass(frozen=True)
class _Wait:
    done: bool
    last: bytes

    def __bool__(self) -> bool:
        return self.done


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def metrics(metrics_port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text


def model_loads(text: str) -> dict[str, float]:
    found = re.findall(r'^tollgate_worker_model_loads_total\{model="([^"]+)"\} (\S+)$', text, re.M)
    return {model: float(value) for model, value in found}


def task_time(text: str) -> tuple[float, float]:
    """(sum of seconds, count) of succeeded job tasks, all families: the worker's histogram."""
    total = {"sum": 0.0, "count": 0.0}
    for kind, labels, value in re.findall(
        r"^tollgate_worker_job_duration_seconds_(sum|count)\{([^}]*)\} (\S+)$", text, re.M
    ):
        if 'outcome="succeeded"' in labels:
            total[kind] += float(value)
    return total["sum"], total["count"]


def worker_argv() -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        "-Q",
        "gpu.txt2img,gpu.post",
        "-c",
        "1",
        "-P",
        "prefork",
        "-n",
        f"bench-{secrets.token_hex(3)}@%h",
        "--without-mingle",
        "--without-gossip",
        "-l",
        "info",
    ]


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(kit: Path, n_jobs: int, redis_db: int, work: Path) -> tuple[list[Family], int, Any]:
    from models.manager import ModelManager

    registry = kit / "models.toml"
    redis_url = f"redis://127.0.0.1:6379/{redis_db}"
    redis.Redis.from_url(redis_url).flushdb()
    metrics_port = free_port()
    with bench_database(None, ADMIN_URL) as db_url:
        env = {
            **os.environ,
            "TOLLGATE_DATABASE_URL": db_url,
            **bench_secrets(),
            "TOLLGATE_REDIS_URL": redis_url,
            "TOLLGATE_STORAGE_URL": str(work / "storage"),
            "TOLLGATE_MODELS": str(registry),
            "TOLLGATE_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "TOLLGATE_WORKER_METRICS_PORT": str(metrics_port),
            "PROMETHEUS_MULTIPROC_DIR": str(work / "prometheus"),
            "PYTHONUNBUFFERED": "1",
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith("TOLLGATE_")})
        os.environ.pop("TOLLGATE_WORKER_METRICS_PORT")  # only the worker serves metrics
        engine = make_engine(db_url)
        account = accounts.create_account(engine, "bench-workers", "business").id
        run_transaction(
            engine,
            lambda c: ledger.grant(
                c, account, "image", 1_000_000, source="adjustment", reference=f"bench-{account}"
            ),
        )
        worker_log = work / "worker.log"
        proc = spawn(worker_argv(), env, worker_log)
        try:
            wait_log(worker_log, b"ready.")
            runner = Runner(engine, Storage(str(work / "storage")), redis_url, account)
            manager = ModelManager(registry, device="cpu")
            fams = families()
            for fam in fams:
                log(f"{fam.name}: warm-up")
                fam.direct(manager, -1)
                runner.run(fam.spec(-1))
                before = task_time(metrics(metrics_port))
                for i in range(n_jobs):
                    fam.direct_s.append(timed(lambda f=fam, i=i: f.direct(manager, i)))
                    elapsed, sent = runner.run(fam.spec(i))
                    fam.worker_s.append(elapsed)
                    fam.submit_s.append(sent)
                after = task_time(metrics(metrics_port))
                fam.task_s = (after[0] - before[0]) / max(after[1] - before[1], 1)
                log(
                    f"{fam.name}: direct {statistics.median(fam.direct_s):.3f} s, "
                    f"worker {statistics.median(fam.worker_s):.3f} s"
                )
            extra = 0
            while runner.jobs_run < LOAD_JOBS_MIN:  # top up to 20 consecutive jobs
                runner.run(fams[extra % len(fams)].spec(JOBS_MAX + extra))
                extra += 1
            loads = model_loads(metrics(metrics_port))
            direct_loads = {m: manager.load_count(m) for m in sorted(loads)}
        except Exception:
            log(f"worker log tail:\n{worker_log.read_text()[-3000:]}")
            raise
        finally:
            stop(proc)
            engine.dispose()
    return fams, runner.jobs_run, (loads, direct_loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5, help=f"jobs per family (1..{JOBS_MAX})")
    parser.add_argument("--kit", type=Path, help="tiny kit folder to reuse (built if missing)")
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch/OpenMP threads in this process and the worker (default: torch's own, one "
        "per core; 1 is steadier on a box shared with other load)",
    )
    args = parser.parse_args()
    n_jobs = max(1, min(args.jobs, JOBS_MAX))
    if args.threads > 0:  # before torch is imported here, and inherited by the worker
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["TOLLGATE_DEVICE"] = "cpu"
    quiet()
    from models.tiny import make_tiny

    work = Path(tempfile.mkdtemp(prefix="tollgate-bench-workers-"))
    kit = args.kit or work / "kit"
    try:
        start = time.perf_counter()
        make_tiny(kit)
        log(f"tiny kit ready in {time.perf_counter() - start:.1f} s at {kit}")
        fams, jobs_run, (loads, direct_loads) = measure(kit, n_jobs, args.redis_db, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import torch

    print(
        f"{n_jobs} measured jobs per family after one warm-up each; median per job; "
        f"device cpu, torch threads {torch.get_num_threads()}, worker -P prefork -c 1"
    )
    print(
        f"{'family':<20}{'direct s':>10}{'via worker s':>14}{'ratio':>8}  {'verdict':<9}"
        f"{'+ms/job':>9}{'submit ms':>11}{'task s':>9}"
    )
    for fam in fams:
        d, w = statistics.median(fam.direct_s), statistics.median(fam.worker_s)
        ratio = w / d
        verdict = "MET" if ratio <= TARGET_RATIO else "NOT MET"
        print(
            f"{fam.name:<20}{d:>10.3f}{w:>14.3f}{ratio:>8.2f}  {verdict:<9}"
            f"{(w - d) * 1000:>9.0f}{statistics.median(fam.submit_s) * 1000:>11.0f}"
            f"{fam.task_s:>9.3f}"
        )
    print(
        f"ratio = via worker / direct (target <= {TARGET_RATIO}); +ms/job = via worker - direct; "
        "submit ms = jobs.submit + relay in the caller (part of via worker); task s = mean "
        "Celery task run inside the worker (tollgate_worker_job_duration_seconds)"
    )
    worst = max(loads.values(), default=0)
    verdict = "MET" if loads and worst <= TARGET_LOADS else "NOT MET"
    per_model = ", ".join(f"{m}={v:g}" for m, v in sorted(loads.items())) or "none reported"
    print(
        f"loads per model across {jobs_run} consecutive worker jobs (target {TARGET_LOADS}): "
        f"{per_model}  {verdict}"
    )
    print(f"(direct ModelManager in this process: {direct_loads})")


if __name__ == "__main__":
    main()
