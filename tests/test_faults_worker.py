"""A real Celery worker through database faults: pg_terminate_backend of its connections
during begin, progress and finish, and a whole outage (a TCP proxy cut for a few seconds)
while a job renders. Each job succeeds and is charged exactly once; the worker's metrics
port counts the retries."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url

from billing.db import run_transaction
from billing.tables import entries, holds
from orchestrator.storage import Storage
from tests.api_helpers import free_port
from tests.ledger_helpers import grant, new_account
from tests.lifecycle_helpers import results, submit, wait_terminal
from tests.support.behaviours import WORKER_APP_NAME, terminate_worker_connections
from tests.support.services import celery_worker
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture(scope="module")
def pg_proxy(pg_url: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy(make_url(pg_url).port or 5432)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def worker(
    service_env: dict[str, str],
    settings_env: None,
    pg_url: str,
    pg_proxy: TcpProxy,
    metrics_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    url = (
        make_url(pg_url)
        .set(port=pg_proxy.port, query={"application_name": WORKER_APP_NAME})
        .render_as_string(hide_password=False)
    )
    env = {
        **service_env,
        "TOLLGATE_DATABASE_URL": url,
        "TOLLGATE_WORKER_METRICS_PORT": str(metrics_port),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("prom")),
    }
    with celery_worker(
        env, tmp_path_factory.mktemp("logs"), queues="gpu.txt2img", concurrency=1
    ) as proc:
        yield proc


@pytest.fixture
def account(pg_engine: Engine) -> str:
    acc = new_account(pg_engine)
    grant(pg_engine, acc, 20)
    return acc


def txt2img(test: str, num_images: int = 2) -> dict[str, Any]:
    return {
        "type": "txt2img",
        "prompt": f"test:{test}",
        "steps": 20,
        "num_images": num_images,
    }


def worker_retries(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tollgate_transient_retries_total{") and 'process="worker"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def assert_charged_once(engine: Engine, job_id: str, price: int) -> None:
    done = wait_terminal(engine, job_id)
    assert (done.status, done.charged, done.refunded, done.attempt) == ("succeeded", price, 0, 1)
    assert [(r.attempt, r.applied) for r in results(engine, job_id)] == [(1, True)]

    def ledger_rows(conn: Any) -> tuple[Any, int]:
        hold = conn.execute(select(holds).where(holds.c.reference == job_id)).one()
        spent = conn.execute(
            select(func.coalesce(func.sum(entries.c.delta_balance), 0)).where(
                entries.c.hold_id == hold.id
            )
        ).scalar_one()
        return hold, int(spent)

    hold, spent = run_transaction(engine, ledger_rows)
    assert (hold.status, hold.committed, spent) == ("committed", price, -price)


@pytest.fixture
def ctx(pg_engine: Engine, storage: Storage, redis_url: str, worker: Any) -> Any:
    class Ctx:
        def submit(self, account: str, spec: dict[str, Any]) -> str:
            return submit(pg_engine, storage, redis_url, account, spec)

    return Ctx()


def test_terminated_connection_at_begin(
    ctx: Any, pg_engine: Engine, account: str, metrics_port: int
) -> None:
    warm = ctx.submit(account, txt2img("ok", 1))  # the worker now holds a pooled connection
    assert_charged_once(pg_engine, warm, 1)
    before = worker_retries(metrics_port)
    assert terminate_worker_connections() >= 1
    job_id = ctx.submit(account, txt2img("ok"))  # begin meets the dead connection
    assert_charged_once(pg_engine, job_id, 2)
    assert worker_retries(metrics_port) > before


@pytest.mark.parametrize("when", ["progress", "finish"])
def test_terminated_connection_during(
    ctx: Any, pg_engine: Engine, account: str, metrics_port: int, when: str
) -> None:
    before = worker_retries(metrics_port)
    job_id = ctx.submit(account, txt2img(f"pgkill:{when}"))
    assert_charged_once(pg_engine, job_id, 2)
    assert worker_retries(metrics_port) > before


def test_an_outage_while_rendering_and_finishing(
    ctx: Any, pg_engine: Engine, account: str, pg_proxy: TcpProxy, metrics_port: int
) -> None:
    before = worker_retries(metrics_port)
    job_id = ctx.submit(account, txt2img("slow:1.5", 2))  # one output per 1.5 s

    def outage() -> None:
        time.sleep(1.0)
        pg_proxy.cut()  # progress writes fail for the rest of the render, then finish waits
        time.sleep(3.0)
        pg_proxy.restore()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    thread.join()
    assert_charged_once(pg_engine, job_id, 2)
    assert worker_retries(metrics_port) > before
