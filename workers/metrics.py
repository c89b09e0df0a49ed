"""Prometheus metrics of a Celery worker, fed by Celery signals.

    tollgate_worker_jobs_total{family,queue,outcome}      jobs ended, by job family and outcome
    tollgate_worker_job_duration_seconds{family,outcome}  wall time of a task run (histogram)
    tollgate_worker_jobs_running{family}                  tasks running now
    tollgate_worker_queue_wait_seconds{family}            submit to first start (histogram)
    tollgate_worker_job_latency_seconds{family,outcome}   submit to end, end to end (histogram)
    tollgate_worker_model_loads_total{model}              models loaded into the warm cache
    tollgate_worker_gpu_memory_bytes{device,kind}         CUDA memory: allocated / reserved / peak
    tollgate_leases_expired_total{family}                 leases the sweep found expired
    tollgate_jobs_redispatched_total{family}              jobs the sweep dispatched again

`outcome` is the job's status the task returned (succeeded, failed, canceled, skipped: a
duplicate delivery) or, when the task itself raised, `error` (time limits included), or
`revoked`. A phase that ends with the job moving on (a tune's training, then `rendering`)
counts as `succeeded`. The latency histograms' `family` is the job type (a tune's end to end
is observed when its render ends). GPU memory is read after each task only where torch is
already imported and CUDA initialised: this module never imports torch (the API image has
none).

Celery runs tasks in prefork children, so the metrics use prometheus_client's multiprocess
mode when PROMETHEUS_MULTIPROC_DIR is set (the images set it): every process writes its own
files and the worker's main process serves the sum on TOLLGATE_WORKER_METRICS_PORT. Without
PROMETHEUS_MULTIPROC_DIR (`-P solo`/threads) the process's default registry is served.
Nothing is served when TOLLGATE_WORKER_METRICS_PORT is unset.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import sys
import time
from typing import Any, Final

from celery.signals import (
    task_failure,
    task_postrun,
    task_prerun,
    task_revoked,
    worker_init,
    worker_process_shutdown,
    worker_ready,
)
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from orchestrator.execution.finisher import FINISHING
from orchestrator.jobs.families import FAMILIES

log = logging.getLogger(__name__)

ENV_PORT: Final = "TOLLGATE_WORKER_METRICS_PORT"
ENV_MULTIPROC: Final = "PROMETHEUS_MULTIPROC_DIR"
DURATION_BUCKETS: Final = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600, 7200)

if os.environ.get(ENV_MULTIPROC):  # before any value file is written (emptyDir at /tmp)
    os.makedirs(os.environ[ENV_MULTIPROC], exist_ok=True)

_BY_TASK: Final = {f.task_name: (job_type, f.queue) for job_type, f in FAMILIES.items()}

JOBS = Counter("tollgate_worker_jobs", "Jobs ended on this worker", ["family", "queue", "outcome"])
DURATION = Histogram(
    "tollgate_worker_job_duration_seconds",
    "Wall time of a job's task run",
    ["family", "outcome"],
    buckets=DURATION_BUCKETS,
)
RUNNING = Gauge(
    "tollgate_worker_jobs_running",
    "Job tasks running now",
    ["family"],
    multiprocess_mode="livesum",
)
MODEL_LOADS = Counter(
    "tollgate_worker_model_loads", "Models loaded into a worker's warm cache", ["model"]
)
GPU_MEMORY = Gauge(
    "tollgate_worker_gpu_memory_bytes",
    "CUDA memory of the worker processes (allocated, reserved, peak allocated)",
    ["device", "kind"],
    multiprocess_mode="livesum",
)

# Counted where the lease sweep runs (the maintenance queue's worker): see count_recoveries.
LEASES_EXPIRED = Counter(
    "tollgate_leases_expired", "Job leases found expired (worker lost)", ["family"]
)
REDISPATCHED = Counter(
    "tollgate_jobs_redispatched", "Jobs dispatched again after their lease expired", ["family"]
)
QUEUE_WAIT = Histogram(
    "tollgate_worker_queue_wait_seconds",
    "Time from submit to a job's first start on a worker",
    ["family"],
    buckets=DURATION_BUCKETS,
)
LATENCY = Histogram(
    "tollgate_worker_job_latency_seconds",
    "Time from submit to a job's end (end to end)",
    ["family", "outcome"],
    buckets=DURATION_BUCKETS,
)
OUTCOMES: Final = ("succeeded", "failed", "canceled", "expired", "skipped", "error", "revoked")

_started: dict[str, float] = {}
_loads_seen: dict[str, int] = {}


def family_of(task_name: str | None) -> tuple[str, str] | None:
    """(job family, queue) of a job task; None for callbacks and maintenance tasks."""
    return _BY_TASK.get(task_name or "")


def outcome_of(retval: Any, state: str | None) -> str:
    if isinstance(retval, dict) and isinstance(retval.get("status"), str):
        status = str(retval["status"])
        # Not an end: the phase succeeded and the job moved on (training -> rendering).
        return status if status in OUTCOMES else "succeeded"
    return "error" if state == "FAILURE" else (state or "unknown").lower()


def observe_latency(retval: Any) -> None:
    """Queue wait and end-to-end latency from a job task's result (orchestrator.execution)."""
    if not isinstance(retval, dict) or not isinstance(retval.get("job_type"), str):
        return
    family = str(retval["job_type"])
    if family not in FAMILIES:
        return
    waited = retval.get("queue_wait_s")
    if isinstance(waited, int | float):
        QUEUE_WAIT.labels(family).observe(waited)
    latency = retval.get("latency_s")
    if isinstance(latency, int | float):
        LATENCY.labels(family, outcome_of(retval, None)).observe(latency)


def _record(task_id: str | None, task_name: str | None, outcome: str) -> None:
    family = family_of(task_name)
    if family is None:
        return
    job_type, queue = family
    JOBS.labels(job_type, queue, outcome).inc()
    started = _started.pop(task_id or "", None)
    if started is not None:
        DURATION.labels(job_type, outcome).observe(time.monotonic() - started)
        RUNNING.labels(job_type).dec()


@task_prerun.connect
def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    family = family_of(getattr(task, "name", None))
    if family is not None and task_id:
        _started[task_id] = time.monotonic()
        RUNNING.labels(family[0]).inc()


def job_finished(task_id: str | None, task_name: str | None, retval: Any) -> None:
    """A job task's result applied by the process's finisher after the task returned
    (orchestrator.execution.finisher): counted as the task's end is otherwise."""
    _record(task_id, task_name, outcome_of(retval, None))
    observe_latency(retval)


@task_postrun.connect
def _on_postrun(
    task_id: str | None = None,
    task: Any = None,
    retval: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    if isinstance(retval, dict) and retval.get("status") == FINISHING:
        pass  # counted by job_finished once the finisher has applied the result
    elif state == "FAILURE":  # counted by task_failure, which also sees hard time limits
        if task_id in _started:
            _record(task_id, getattr(task, "name", None), "error")
    else:
        _record(task_id, getattr(task, "name", None), outcome_of(retval, state))
        observe_latency(retval)
    observe_models()
    observe_gpu_memory()


@task_failure.connect
def _on_failure(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    # In the child for an exception (postrun follows); in the main process for a hard time
    # limit or a lost child, where no prerun was seen: counted here, without a duration.
    if task_id not in _started:
        _record(task_id, getattr(sender, "name", None), "error")


@task_revoked.connect
def _on_revoked(request: Any = None, **_: Any) -> None:
    _record(getattr(request, "id", None), getattr(request, "task", None), "revoked")


def count_recoveries(recovered: list[Any]) -> None:
    """Count what a lease sweep did (orchestrator.settlement.lease_sweep.Recovery items)."""
    for r in recovered:
        LEASES_EXPIRED.labels(r.family).inc()
        if r.action == "redispatched":
            REDISPATCHED.labels(r.family).inc()


def observe_models() -> None:
    """Count loads of the warm model cache since the last look (models.cache, if in use)."""
    cache_module = sys.modules.get("models.cache")
    cache = getattr(cache_module, "_default", None)
    counts = getattr(cache, "load_counts", None)
    if not isinstance(counts, dict):
        return
    for key, count in list(counts.items()):
        new = int(count) - _loads_seen.get(key, 0)
        if new > 0:
            MODEL_LOADS.labels(key).inc(new)
            _loads_seen[key] = int(count)


def observe_gpu_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is None:
        return
    with contextlib.suppress(Exception):
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            GPU_MEMORY.labels(device, "allocated").set(torch.cuda.memory_allocated(index))
            GPU_MEMORY.labels(device, "reserved").set(torch.cuda.memory_reserved(index))
            GPU_MEMORY.labels(device, "peak").set(torch.cuda.max_memory_allocated(index))


def _multiproc_dir() -> str | None:
    return os.environ.get(ENV_MULTIPROC) or None


@worker_init.connect
def _on_worker_init(**_: Any) -> None:
    """Main process, before the pool forks: drop files a previous run of this container left."""
    path = _multiproc_dir()
    if path:
        os.makedirs(path, exist_ok=True)
        for name in glob.glob(os.path.join(path, "*.db")):
            with contextlib.suppress(OSError):
                os.remove(name)


@worker_process_shutdown.connect
def _on_process_shutdown(pid: int | None = None, **_: Any) -> None:
    if _multiproc_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


def registry() -> CollectorRegistry:
    """What the worker serves: the sum over its processes, or this process's registry."""
    if _multiproc_dir():
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return merged
    return REGISTRY


@worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    port = os.environ.get(ENV_PORT)
    if not port:
        return
    from prometheus_client import start_http_server

    start_http_server(int(port), registry=registry())
    log.info("worker metrics on :%s/metrics", port)
