"""The job lifecycle end to end: real PostgreSQL, real Redis, real Celery worker processes
running the product's tasks with scripted test runners (tests/support/behaviours.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, update

from billing import ledger
from billing.clock import utcnow
from billing.db import run_transaction
from billing.verify import verify
from orchestrator.jobs import service as jobs
from orchestrator.scheduling import scheduler
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.scheduling.outbox import relay
from orchestrator.scheduling.scheduler import nudge
from orchestrator.settings import get_settings
from orchestrator.settlement.reaper import reap
from orchestrator.storage import Storage
from orchestrator.tables import jobs as jobs_table
from tests.ledger_helpers import grant, new_account
from tests.lifecycle_helpers import available, results, row, submit, wait_terminal, wait_until
from tests.support.services import celery_worker, kill, wait_for_pid


@pytest.fixture(scope="module")
def worker(
    service_env: dict[str, str], settings_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    with celery_worker(service_env, tmp_path_factory.mktemp("logs")) as proc:
        yield proc


@pytest.fixture
def account(pg_engine: Engine) -> str:
    acc = new_account(pg_engine)
    grant(pg_engine, acc, 20)
    return acc


def txt2img(num_images: int = 1, test: str = "ok", **extra: Any) -> dict[str, Any]:
    return {
        "type": "txt2img",
        "prompt": "a lighthouse",
        "width": 512,
        "height": 512,
        "steps": 20,
        "num_images": num_images,
        **({"test": test} if test != "ok" else {}),  # lifecycle_helpers.submit scripts it
        **extra,
    }


@pytest.fixture
def ctx(pg_engine: Engine, storage: Storage, redis_url: str, worker: Any) -> Any:
    class Ctx:
        engine = pg_engine

        def submit(self, account: str, spec: dict[str, Any], publish: bool = True) -> str:
            return submit(pg_engine, storage, redis_url, account, spec, publish=publish)

    return Ctx()


def test_success_commits_the_hold(ctx: Any, account: str) -> None:
    job_id = ctx.submit(account, txt2img(num_images=2))
    done = wait_terminal(ctx.engine, job_id)
    assert (done.status, done.charged, done.refunded) == ("succeeded", 2, 0)
    assert len([o for o in done.outputs if o["delivered"]]) == 2
    assert available(ctx.engine, account) == 18
    view = jobs.get(ctx.engine, account, job_id)
    assert view["outputs"][0]["url"] == f"/v1/jobs/{job_id}/outputs/0"  # no signer: the API route
    assert view["progress"] == {"step": 2, "total": 2}


def test_failure_refunds(ctx: Any, account: str) -> None:
    job_id = ctx.submit(account, txt2img(num_images=3, test="fail"))
    done = wait_terminal(ctx.engine, job_id)
    assert (done.status, done.charged, done.refunded) == ("failed", 0, 3)
    assert "scripted failure" in done.error
    assert available(ctx.engine, account) == 20


def test_partial_batch_charges_only_delivered(ctx: Any, account: str) -> None:
    job_id = ctx.submit(account, txt2img(num_images=4, test="partial:1"))
    done = wait_terminal(ctx.engine, job_id)
    assert (done.status, done.charged, done.refunded) == ("succeeded", 3, 1)
    assert "1 of 4 outputs not delivered" in done.error
    assert available(ctx.engine, account) == 17


def test_cancel_before_running_refunds_at_once(ctx: Any, account: str, redis_url: str) -> None:
    job_id = ctx.submit(account, txt2img(num_images=2), publish=False)
    canceled = jobs.cancel(ctx.engine, account, job_id)
    assert (canceled["status"], canceled["charged"], canceled["refunded"]) == ("canceled", 0, 2)
    assert available(ctx.engine, account) == 20
    assert jobs.cancel(ctx.engine, account, job_id)["status"] == "canceled"  # idempotent
    # The task still reaches a worker (published late): the worker must leave it alone.
    nudge(ctx.engine, Publisher(redis_url), job_id)
    marker = ctx.submit(account, txt2img())  # runs after the canceled task on the same queue
    wait_terminal(ctx.engine, marker)
    assert row(ctx.engine, job_id).status == "canceled"
    assert results(ctx.engine, job_id) == []
    assert available(ctx.engine, account) == 19
    with pytest.raises(jobs.CannotCancel):
        jobs.cancel(ctx.engine, account, marker)


def test_cancel_while_running_charges_only_delivered(ctx: Any, account: str) -> None:
    job_id = ctx.submit(account, txt2img(num_images=4, test="slow:0.4"))
    wait_until(ctx.engine, job_id, lambda r: sum(1 for o in r.outputs if o["delivered"]) >= 1)
    assert jobs.cancel(ctx.engine, account, job_id)["status"] == "running"
    done = wait_terminal(ctx.engine, job_id)
    delivered = sum(1 for o in done.outputs if o["delivered"])
    assert done.status == "canceled"
    assert 1 <= delivered < 4
    assert (done.charged, done.refunded) == (delivered, 4 - delivered)
    assert available(ctx.engine, account) == 20 - delivered


def test_duplicate_delivery_is_charged_once(ctx: Any, account: str, redis_url: str) -> None:
    job_id = ctx.submit(account, txt2img(num_images=2))
    wait_terminal(ctx.engine, job_id)
    Publisher(redis_url)("dispatch", {"job_id": job_id, "type": "txt2img"})  # run it twice
    # Two concurrent deliveries of one job: one attempt supersedes the other.
    racing = ctx.submit(account, txt2img(num_images=2, test="sleep:1"))
    Publisher(redis_url)("dispatch", {"job_id": racing, "type": "txt2img"})
    wait_terminal(ctx.engine, racing)
    wait_until(ctx.engine, racing, lambda r: len(results(ctx.engine, racing)) >= 1)
    time.sleep(2.5)  # let the second delivery of the first job and the loser finish
    for jid in (job_id, racing):
        done = row(ctx.engine, jid)
        assert (done.status, done.charged) == ("succeeded", 2)
        assert sum(1 for r in results(ctx.engine, jid) if r.applied) == 1
    assert available(ctx.engine, account) == 16
    assert run_transaction(ctx.engine, verify) == []


def test_worker_killed_mid_job_is_redelivered_and_settled_once(
    ctx: Any, account: str, redis_url: str
) -> None:
    job_id = ctx.submit(account, txt2img(num_images=1, test="sleep:2"))
    first_pid = wait_for_pid(redis_url, job_id)
    kill(first_pid)
    done = wait_terminal(ctx.engine, job_id, timeout_s=60)
    assert (done.status, done.charged, done.attempt) == ("succeeded", 1, 2)
    assert [r.applied for r in results(ctx.engine, job_id)] == [True]
    # Redelivered to the same worker node, whose killed child held a live lease: taken over
    # at once instead of after the lease TTL.
    attempts = jobs.get(ctx.engine, account, job_id)["attempts"]
    assert [(a["number"], a["outcome"]) for a in attempts] == [(1, "worker_lost"), (2, "succeeded")]
    assert available(ctx.engine, account) == 19
    assert run_transaction(ctx.engine, verify) == []


def test_reaper_expires_and_refunds_and_a_late_result_is_not_charged(
    ctx: Any, account: str
) -> None:
    running = ctx.submit(account, txt2img(num_images=2, test="sleep:1.5"))
    wait_until(ctx.engine, running, lambda r: r.status == "running")
    queued = ctx.submit(account, txt2img(num_images=2), publish=False)  # no nudge: it waits
    later = row(ctx.engine, running).deadline_at + timedelta(seconds=1)
    expired = reap(ctx.engine, now=later)
    assert {queued, running} <= set(expired)
    for jid in (queued, running):
        assert (row(ctx.engine, jid).status, row(ctx.engine, jid).refunded) == ("expired", 2)
    late = wait_until(ctx.engine, running, lambda r: len(results(ctx.engine, running)) == 1)
    assert late.status == "expired" and late.charged == 0
    assert results(ctx.engine, running)[0].applied is False
    assert available(ctx.engine, account) == 20


def test_unpublished_job_is_dispatched_by_the_periodic_dispatcher(
    ctx: Any, account: str, redis_url: str
) -> None:
    job_id = ctx.submit(account, txt2img(), publish=False)  # "crash" before the nudge
    assert row(ctx.engine, job_id).status in ("queued", "dispatched")  # another job's nudge
    nudge(ctx.engine, Publisher(redis_url))  # what beat's dispatch task runs
    relay(ctx.engine, Publisher(redis_url))  # what beat's republish task runs
    done = wait_terminal(ctx.engine, job_id)
    assert (done.status, done.charged) == ("succeeded", 1)
    b = run_transaction(ctx.engine, lambda c: ledger.get_balance(c, account, "image"))
    assert (b.held, b.available) == (0, 19)


def test_a_lost_delivery_is_sent_again_once_stale_and_charged_once(
    ctx: Any, account: str, redis_url: str
) -> None:
    time.sleep(0.5)  # the last job's post-job pass is over: nothing else dispatches
    job_id = ctx.submit(account, txt2img(), publish=False)

    def dispatch(c: Any) -> None:  # as the dispatcher does; its task "sent" and lost
        c.execute(
            update(jobs_table)
            .where(jobs_table.c.id == job_id, jobs_table.c.status == "queued")
            .values(status="dispatched")
        )
        scheduler.taken(c, job_id, utcnow())

    run_transaction(ctx.engine, dispatch)
    assert row(ctx.engine, job_id).status == "dispatched"
    publish = Publisher(redis_url)
    assert scheduler.resend_stale(ctx.engine, publish) == []  # not stale yet
    later = utcnow() + timedelta(seconds=get_settings().dispatch_resend_after_s + 1)
    assert scheduler.resend_stale(ctx.engine, publish, now=later) == [job_id]
    done = wait_terminal(ctx.engine, job_id)
    assert (done.status, done.charged) == ("succeeded", 1)
    assert scheduler.resend_stale(ctx.engine, publish, now=later + timedelta(hours=1)) == []


class _Receiver:
    """A localhost HTTP endpoint that records callbacks; fails the first `fail_first`."""

    def __init__(self, fail_first: int = 0) -> None:
        import http.server
        import threading

        received: list[tuple[bytes, dict[str, str]]] = []
        self.received = received
        self.fail_left = fail_first
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.fail_left > 0:
                    outer.fail_left -= 1
                    self.send_response(500)
                else:
                    received.append((body, dict(self.headers)))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait(self, count: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= count, "callback never arrived"


def test_callback_is_signed_and_retried(
    ctx: Any, account: str, storage: Storage, redis_url: str, service_env: dict[str, str]
) -> None:
    from standardwebhooks import Webhook

    receiver = _Receiver(fail_first=1)
    try:
        job_id = jobs.submit(
            ctx.engine, storage, account, txt2img(), callback_url=receiver.url
        ).job["id"]
        nudge(ctx.engine, Publisher(redis_url), job_id)
        wait_terminal(ctx.engine, job_id)
        receiver.wait(1)
    finally:
        receiver.server.shutdown()
    body, headers = receiver.received[0]
    message = Webhook(service_env["TOLLGATE_CALLBACK_SECRET"]).verify(body, headers)
    assert headers["webhook-id"] == f"{job_id}.completed"
    assert message["type"] == "job.completed"
    assert message["data"]["id"] == job_id and message["data"]["status"] == "succeeded"
    assert receiver.fail_left == 0  # the first POST failed and was retried
