"""A worker's finisher (orchestrator.execution.finisher), the handed finish of
orchestrator.execution.protocol on real PostgreSQL, outputs flushed before they are charged,
and the direct connection that begin and finish run on (orchestrator.db_direct)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text, update

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator import db_direct, faults
from orchestrator.execution import protocol as execution
from orchestrator.execution.finisher import FINISHING, Finisher
from orchestrator.jobs import service as jobs
from orchestrator.jobs import states
from orchestrator.settlement import lease_sweep
from orchestrator.storage import Storage
from orchestrator.tables import jobs as jobs_table
from tests.ledger_helpers import grant, new_account

SPEC = {"type": "txt2img", "prompt": "a lighthouse", "steps": 20, "num_images": 2}

# ------------------------------------------------------------------ the finisher alone


def test_work_runs_in_order_on_one_other_thread() -> None:
    finisher = Finisher(pending_max=4)
    ran: list[tuple[int, str]] = []
    for i in range(10):
        finisher.hand(lambda i=i: ran.append((i, threading.current_thread().name)))
    assert finisher.drain(5)
    assert [i for i, _ in ran] == list(range(10))
    assert {name for _, name in ran} == {"tollgate-finisher"}
    assert finisher.applied == 10
    finisher.stop()


def test_a_full_finisher_makes_the_task_wait_for_room() -> None:
    finisher = Finisher(pending_max=1)
    gate = threading.Event()
    finisher.hand(gate.wait)  # taken by the thread at once, then blocks it
    deadline = time.monotonic() + 5
    while finisher._queue and time.monotonic() < deadline:
        time.sleep(0.01)
    finisher.hand(lambda: None)  # waits in the queue: it is now full
    handed = threading.Event()
    thread = threading.Thread(target=lambda: (finisher.hand(lambda: None), handed.set()))
    thread.start()
    assert not handed.wait(0.3)  # the third waits for room
    assert finisher.waits == 1
    gate.set()
    assert handed.wait(5)
    thread.join(5)
    assert finisher.drain(5) and finisher.applied == 3
    finisher.stop()


def test_a_task_that_finds_no_room_in_time_applies_its_own_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orchestrator.execution import finisher as module

    monkeypatch.setattr(module, "HAND_WAIT_MAX_S", 0.2)
    finisher = Finisher(pending_max=1)
    gate = threading.Event()
    finisher.hand(gate.wait)  # the thread is stuck in it
    deadline = time.monotonic() + 5
    while finisher._queue and time.monotonic() < deadline:
        time.sleep(0.01)
    finisher.hand(lambda: None)  # fills the queue
    ran: list[str] = []
    finisher.hand(lambda: ran.append(threading.current_thread().name))  # no room in 0.2 s
    assert ran == [threading.current_thread().name]
    gate.set()
    assert finisher.stop(5)


def test_a_failing_work_is_logged_and_the_next_runs(caplog: pytest.LogCaptureFixture) -> None:
    finisher = Finisher()
    ran: list[int] = []

    def boom() -> None:
        raise RuntimeError("finish failed")

    finisher.hand(boom)
    finisher.hand(lambda: ran.append(1))
    assert finisher.drain(5)
    assert ran == [1]
    assert "lease will lapse" in caplog.text
    finisher.stop()


def test_stop_applies_what_waits_then_hands_run_inline() -> None:
    finisher = Finisher(pending_max=8)
    ran: list[str] = []
    for _ in range(5):
        finisher.hand(lambda: (time.sleep(0.01), ran.append("thread")))
    assert finisher.stop(5)
    assert ran == ["thread"] * 5
    finisher.hand(lambda: ran.append(threading.current_thread().name))
    assert ran[-1] == threading.current_thread().name


def test_a_stop_that_times_out_says_so() -> None:
    finisher = Finisher(pending_max=2)
    gate = threading.Event()
    finisher.hand(gate.wait)
    finisher.hand(lambda: None)
    assert finisher.stop(0.2) is False  # one is running, one left for the lease sweep
    gate.set()


# ------------------------------------------------------------- the handed finish


def submitted(engine: Engine, storage: Storage, spec: dict[str, Any] = SPEC) -> tuple[str, str]:
    account = new_account(engine)
    grant(engine, account, 10)
    job_id = jobs.submit(engine, storage, account, dict(spec)).job["id"]
    return account, job_id


def deliver_two(ctx: execution.RunContext) -> None:
    ctx.progress(1, 1)
    ctx.deliver(0, b"png-0", {"seed": 0})
    ctx.deliver(1, b"png-1", {"seed": 1})


def job_row(engine: Engine, job_id: str) -> Any:
    return run_transaction(
        engine, lambda c: c.execute(select(jobs_table).where(jobs_table.c.id == job_id)).one()
    )


def run_handed(
    engine: Engine, storage: Storage, job_id: str, runner: execution.Runner
) -> tuple[dict[str, Any], list[Callable[[], Any]], list[dict[str, Any]]]:
    handed: list[Callable[[], Any]] = []
    finished: list[dict[str, Any]] = []
    answer = execution.execute(
        engine,
        storage,
        job_id,
        "w@host",
        runner,
        hand_finish=handed.append,
        on_finished=finished.append,
    )
    return answer, handed, finished


def test_a_handed_result_is_applied_by_the_finisher_and_the_lease_held_until(
    pg_engine: Engine, storage: Storage
) -> None:
    account, job_id = submitted(pg_engine, storage)
    answer, handed, finished = run_handed(pg_engine, storage, job_id, deliver_two)
    assert answer["status"] == FINISHING and len(handed) == 1 and finished == []
    before = job_row(pg_engine, job_id)
    assert before.status == states.RUNNING and before.lease_token is not None
    assert before.charged == 0
    handed[0]()  # the finisher's turn
    assert [f["status"] for f in finished] == [states.SUCCEEDED]
    job = jobs.get(pg_engine, account, job_id)
    assert (job["status"], job["charged"], job["refunded"]) == (states.SUCCEEDED, 2, 0)
    assert [o["index"] for o in job["outputs"]] == [0, 1] and job["undelivered"] == []
    assert all(storage.exists(f"outputs/{job_id}/a1_{i}.png") for i in (0, 1))


def test_a_process_dying_before_its_finisher_ran_is_recovered_by_the_sweep(
    pg_engine: Engine, storage: Storage
) -> None:
    """The task returned (its message acked) and the process died before the result was
    applied: the job stays running under a lease nobody renews; the sweep dispatches it
    again and the new attempt is charged once."""
    account, job_id = submitted(pg_engine, storage)
    answer, handed, _ = run_handed(pg_engine, storage, job_id, deliver_two)
    assert answer["status"] == FINISHING
    handed.clear()  # the process is gone: nothing applies the result
    run_transaction(  # ... and its lease runs out (the heartbeat died with it)
        pg_engine,
        lambda c: c.execute(
            update(jobs_table)
            .where(jobs_table.c.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        ),
    )
    recovered = lease_sweep.sweep(pg_engine)
    assert [r.job_id for r in recovered] == [job_id]
    result = execution.execute(pg_engine, storage, job_id, "w2@host", deliver_two)
    assert result["status"] == states.SUCCEEDED
    job = jobs.get(pg_engine, account, job_id)
    assert (job["charged"], job["refunded"], job_row(pg_engine, job_id).attempt) == (2, 0, 2)
    assert [(a["number"], a["outcome"]) for a in job["attempts"]] == [
        (1, "lease_expired"),
        (2, states.SUCCEEDED),
    ]


def test_outputs_that_cannot_be_flushed_fail_the_job_and_are_not_charged(
    pg_engine: Engine, storage: Storage
) -> None:
    account, job_id = submitted(pg_engine, storage)
    answer, handed, finished = run_handed(pg_engine, storage, job_id, deliver_two)
    assert answer["status"] == FINISHING
    folder = storage.local_path(f"outputs/{job_id}")
    assert folder is not None
    shutil.rmtree(folder)  # the files are gone before their flush
    handed[0]()
    assert [f["status"] for f in finished] == [states.FAILED]
    job = jobs.get(pg_engine, account, job_id)
    assert (job["charged"], job["refunded"]) == (0, 2)
    assert job["error"].startswith("outputs not stored")
    assert job["outputs"] == [] and [o["index"] for o in job["undelivered"]] == [0, 1]


def test_outputs_are_flushed_before_a_progress_write_records_them(
    pg_engine: Engine, storage: Storage
) -> None:
    account, job_id = submitted(pg_engine, storage)
    attempt = execution.begin(pg_engine, job_id, "w@host")
    assert attempt is not None
    ctx = execution.RunContext(pg_engine, storage, attempt)
    ctx.deliver(0, b"png-0", {"seed": 0})
    assert ctx.unflushed == [f"outputs/{job_id}/a1_0.png"]
    ctx._last_write = 0.0  # a progress write is due: it records the output, flushed first
    ctx.progress(1, 2)
    assert ctx.unflushed == [] and ctx.unrecorded == []
    assert [o["index"] for o in job_row(pg_engine, job_id).outputs] == [0]
    assert execution.finish(pg_engine, attempt, states.CANCELED, ctx=ctx) == states.CANCELED


def test_storage_put_without_flush_then_flush(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    storage.put("outputs/j/a1_0.png", b"one", flush=False)
    storage.put("outputs/j/a1_1.png", b"two", flush=False)
    assert storage.get("outputs/j/a1_0.png") == b"one"  # whole, under its name, at once
    assert sorted(os.listdir(tmp_path / "outputs" / "j")) == ["a1_0.png", "a1_1.png"]
    storage.flush(["outputs/j/a1_0.png", "outputs/j/a1_1.png"])
    with pytest.raises(FileNotFoundError):
        storage.flush(["outputs/j/missing.png"])
    storage.flush([])


# ------------------------------------------------------------- the direct connection


def direct_pid(engine: Engine) -> int:
    row = db_direct.run_statement(engine, "SELECT pg_backend_pid() AS pid", dict)
    return int(row.pid)


def test_a_direct_connection_is_reused_and_a_terminated_one_replaced(
    pg_engine: Engine,
) -> None:
    first = direct_pid(pg_engine)
    assert direct_pid(pg_engine) == first  # kept between statements
    before = faults.TRANSIENT_RETRIES.labels("cli", faults.POSTGRESQL)._value.get()
    with pg_engine.connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
    replaced = direct_pid(pg_engine)  # retried on a new connection
    assert replaced != first
    assert faults.TRANSIENT_RETRIES.labels("cli", faults.POSTGRESQL)._value.get() > before
    db_direct.close_idle()


def test_a_direct_connection_is_replaced_once_it_is_as_old_as_the_engines_recycle(
    pg_engine: Engine,
) -> None:
    from billing.db import PG_POOL_RECYCLE_S

    first = direct_pid(pg_engine)
    pool = db_direct._pool(pg_engine)
    conn, _ = pool._idle[-1]
    pool._idle[-1] = (conn, time.monotonic() - PG_POOL_RECYCLE_S - 1)  # opened long ago
    assert direct_pid(pg_engine) != first
    assert conn.closed
    db_direct.close_idle()


def test_a_forked_child_opens_its_own_and_leaves_its_parents_alone(pg_engine: Engine) -> None:
    parent = direct_pid(pg_engine)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's outcome is checked through the pipe)
        code = 1
        try:
            import gc

            mine = direct_pid(pg_engine)
            gc.collect()  # the parent's copies must not be closed by this
            os.write(write, str(mine).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(child, 0)
    mine = int(os.read(read, 64) or b"0")
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mine not in (0, parent)
    assert direct_pid(pg_engine) == parent  # still the same, still open
    db_direct.close_idle()


def test_errors_come_out_as_sqlalchemy_errors(pg_engine: Engine) -> None:
    from sqlalchemy.exc import ProgrammingError

    with pytest.raises(ProgrammingError):
        db_direct.run_statement(pg_engine, "SELECT * FROM no_such_table", dict)
    assert direct_pid(pg_engine) > 0  # the connection is still usable
    db_direct.close_idle()
