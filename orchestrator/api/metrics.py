"""Prometheus metrics. A collector reads the database and Redis at scrape time (jobs by
status and type, credits held/committed/released, queue depths); a middleware counts the
API's own requests and their latency; `tollgate_transient_retries_total{process,dependency}`
counts this process's retries after transient faults. Each app has its own registry."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Final

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, case, func, select
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing.db import run_transaction
from billing.tables import holds
from orchestrator.faults import TRANSIENT_RETRIES
from orchestrator.ingress.streams import DEAD_STREAM, JOBS_STREAM
from orchestrator.jobs.families import CALLBACK_QUEUE, GPU_QUEUES
from orchestrator.scheduling.slots import wait_histogram
from orchestrator.tables import dispatch_queue, jobs

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S: Final = 1.0
PLANS: Final = ("free", "standard", "business")


@lru_cache(maxsize=4)
def _redis_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
    )


class TollgateCollector(Collector):
    """Reads current state at each scrape; tolerates the database or Redis being down
    (`tollgate_up{component}` says which answered)."""

    def __init__(self, engine: Callable[[], Engine], redis_url: Callable[[], str]) -> None:
        self._engine = engine
        self._redis_url = redis_url

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "tollgate_up", "Whether a backing service answered this scrape", labels=["component"]
        )
        try:
            yield from run_transaction(self._engine(), self._db_metrics)
            up.add_metric(["database"], 1)
        except Exception:
            log.warning("metrics: database unreachable", exc_info=True)
            up.add_metric(["database"], 0)
        try:
            yield self._queue_metrics()
            yield self._wait_metrics()
            up.add_metric(["redis"], 1)
        except Exception:
            log.warning("metrics: redis unreachable", exc_info=True)
            up.add_metric(["redis"], 0)
        yield up

    def _db_metrics(self, conn: Connection) -> list[Metric]:
        by_state = GaugeMetricFamily(
            "tollgate_jobs", "Jobs by status and type", labels=["status", "type"]
        )
        rows = conn.execute(
            select(jobs.c.status, jobs.c.type, func.count()).group_by(jobs.c.status, jobs.c.type)
        )
        for job_status, job_type, count in rows:
            by_state.add_metric([job_status, job_type], count)
        held = GaugeMetricFamily(
            "tollgate_credits_held", "Credits reserved by open holds", labels=["kind"]
        )
        committed = CounterMetricFamily(
            "tollgate_credits_committed", "Credits charged by resolved holds", labels=["kind"]
        )
        released = CounterMetricFamily(
            "tollgate_credits_released",
            "Credits given back by resolved holds (released, expired, or not charged)",
            labels=["kind"],
        )
        is_open = holds.c.status == "open"
        sums = conn.execute(
            select(
                holds.c.kind,
                func.coalesce(func.sum(case((is_open, holds.c.amount), else_=0)), 0),
                func.coalesce(func.sum(holds.c.committed), 0),
                func.coalesce(
                    func.sum(case((is_open, 0), else_=holds.c.amount - holds.c.committed)), 0
                ),
            ).group_by(holds.c.kind)
        )
        for kind, held_sum, committed_sum, released_sum in sums:
            held.add_metric([kind], int(held_sum))
            committed.add_metric([kind], int(committed_sum))
            released.add_metric([kind], int(released_sum))
        return [by_state, held, committed, released, *self._scheduler_metrics(conn)]

    def _scheduler_metrics(self, conn: Connection) -> list[Metric]:
        waiting = GaugeMetricFamily(
            "tollgate_scheduler_queue_depth",
            "Jobs waiting for a worker slot in the fair scheduler, per queue",
            labels=["queue"],
        )
        running = GaugeMetricFamily(
            "tollgate_scheduler_running",
            "Jobs dispatched to a queue's workers and not yet ended",
            labels=["queue"],
        )
        counts = {
            (q, s): n
            for q, s, n in conn.execute(
                select(dispatch_queue.c.queue, dispatch_queue.c.state, func.count()).group_by(
                    dispatch_queue.c.queue, dispatch_queue.c.state
                )
            )
        }
        for queue in sorted(set(GPU_QUEUES) | {q for q, _ in counts}):
            waiting.add_metric([queue], counts.get((queue, "queued"), 0))
            running.add_metric([queue], counts.get((queue, "dispatched"), 0))
        return [waiting, running]

    def _wait_metrics(self) -> Metric:
        wait = HistogramMetricFamily(
            "tollgate_queue_wait_seconds",
            "Seconds a job waited in the scheduler before dispatch, per plan",
            labels=["plan"],
        )
        client = _redis_for(self._redis_url())
        for plan in PLANS:
            buckets, total = wait_histogram(client, plan)
            wait.add_metric([plan], buckets, total)
        return wait

    def _queue_metrics(self) -> Metric:
        depth = GaugeMetricFamily(
            "tollgate_queue_depth",
            "Celery queue lengths (LLEN) and intake stream lengths (XLEN)",
            labels=["queue"],
        )
        client = _redis_for(self._redis_url())
        pipe = client.pipeline(transaction=False)
        names = (*GPU_QUEUES, CALLBACK_QUEUE)
        for name in names:
            pipe.llen(name)
        streams = (JOBS_STREAM, DEAD_STREAM)
        for stream in streams:
            pipe.xlen(stream)
        for name, value in zip((*names, *streams), pipe.execute(), strict=True):
            depth.add_metric([name], int(value))
        return depth


def make_registry(
    engine: Callable[[], Engine], redis_url: Callable[[], str]
) -> tuple[CollectorRegistry, Counter, Histogram]:
    """A registry with the scrape-time collector, and the API's request metrics."""
    registry = CollectorRegistry()
    registry.register(TollgateCollector(engine, redis_url))
    registry.register(TRANSIENT_RETRIES)  # tollgate_transient_retries_total{process, dependency}
    requests = Counter(
        "tollgate_http_requests", "API requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "tollgate_http_request_duration_seconds",
        "API request latency",
        ["method", "route"],
        registry=registry,
    )
    return registry, requests, latency


# The label children a request's metrics use, per (method, route, status): prometheus'
# `labels()` takes a lock and builds a key each call. Bounded: a client picks the method.
LABEL_CACHE_MAX: Final = 1024


class RequestMetrics:
    """ASGI middleware: request count and latency per method, route template and status."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def _children_for(self, method: str, route: str, code: int) -> tuple[Counter, Histogram]:
        key = (method, route, code)
        found = self._children.get(key)
        if found is None:
            found = (
                self.requests.labels(method, route, str(code)),
                self.latency.labels(method, route),
            )
            if len(self._children) < LABEL_CACHE_MAX:
                self._children[key] = found
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        code = 500

        async def send_status(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            count, latency = self._children_for(scope["method"], route_of(scope), code)
            count.inc()
            latency.observe(time.perf_counter() - started)


def route_of(scope: Scope) -> str:
    """The route template that served a request: FastAPI's routes record themselves in the
    scope; the others (/openapi.json, /docs, the docs assets) are matched here."""
    found = scope.get("route")
    if found is not None:
        return str(getattr(found, "path", "unmatched"))
    for candidate in getattr(scope.get("app"), "routes", ()):
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return str(getattr(candidate, "path", "unmatched"))
    return "unmatched"
