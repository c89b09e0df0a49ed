"""50 processes race to hold 1 credit each against 25: exactly 25 win, on both backends."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest
from sqlalchemy import Engine

from billing import InsufficientCredits, ledger
from billing.db import make_engine, run_transaction
from tests.ledger_helpers import grant, new_account

PROCESSES = 50
CREDITS = 25


def _racer(url: str, account: str, index: int, barrier: Any, results: Any) -> None:
    engine = make_engine(url, pool_size=1)
    barrier.wait()
    try:
        run_transaction(
            engine,
            lambda c: ledger.hold(
                c, account, "image", 1, reference=f"race-{account}-{index}", ttl_s=600
            ),
        )
        results.put("held")
    except InsufficientCredits:
        results.put("insufficient")
    except Exception as exc:  # reported to the test, which fails on it
        results.put(f"error: {exc!r}")
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_racing_processes_never_overdraw(backend: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url" if backend == "postgresql" else "sqlite_db_url")
    engine: Engine = request.getfixturevalue(
        "pg_engine" if backend == "postgresql" else "sqlite_engine"
    )
    account = new_account(engine)
    grant(engine, account, CREDITS)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_racer, args=(url, account, i, barrier, results))
        for i in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sorted(set(outcomes)) == ["held", "insufficient"], outcomes
    assert outcomes.count("held") == CREDITS
    assert outcomes.count("insufficient") == PROCESSES - CREDITS
    b = run_transaction(engine, lambda c: ledger.get_balance(c, account, "image"))
    assert (b.balance, b.held, b.available) == (CREDITS, CREDITS, 0)
