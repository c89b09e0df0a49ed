"""Voids on both backends: only the free remainder goes, held credits are voided when
their hold gives them back, committed ones stay spent and are the shortfall."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, select

from billing import ledger
from billing.clock import utcnow
from billing.db import run_transaction
from billing.tables import entries, grants
from billing.verify import verify
from tests.ledger_helpers import available, grant, new_account, ref


def _hold(engine: Engine, account: str, amount: int) -> str:
    reference = ref("job")
    run_transaction(
        engine,
        lambda c: ledger.hold(c, account, "image", amount, reference=reference, ttl_s=600),
    )
    return reference


def _void(engine: Engine, reference: str, amount: int | None = None) -> ledger.Void:
    return run_transaction(engine, lambda c: ledger.void(c, reference, amount))


def test_void_all_of_an_unspent_grant(any_engine: Engine) -> None:
    account = new_account(any_engine)
    g = grant(any_engine, account, 100)
    done = _void(any_engine, g.reference)
    assert (done.requested, done.voided, done.shortfall) == (100, 100, 0)
    assert available(any_engine, account) == 0
    with any_engine.connect() as conn:
        types = conn.execute(
            select(entries.c.type, entries.c.delta_balance)
            .where(entries.c.account_id == account)
            .order_by(entries.c.id)
        ).all()
    assert [tuple(t) for t in types] == [("grant", 100), ("void", -100)]
    with pytest.raises(ledger.InvalidAmount):
        _void(any_engine, g.reference, 1)  # nothing left to void
    assert _void(any_engine, g.reference).requested == 0  # "all" again: nothing
    assert run_transaction(any_engine, verify) == []


def test_partial_void_then_the_rest(any_engine: Engine) -> None:
    account = new_account(any_engine)
    g = grant(any_engine, account, 100)
    assert _void(any_engine, g.reference, 30).voided == 30
    assert available(any_engine, account) == 70
    with pytest.raises(ledger.InvalidAmount) as info:
        _void(any_engine, g.reference, 71)
    assert info.value.field == "amount"
    assert _void(any_engine, g.reference).voided == 70
    assert available(any_engine, account) == 0


def test_void_after_spending_and_holding(any_engine: Engine) -> None:
    """A 100-credit pack: 30 spent, 20 held by a running job, then refunded in full."""
    account = new_account(any_engine)
    other = grant(any_engine, account, 5)  # never expires, older: burnt before the pack
    pack = grant(any_engine, account, 100)
    spent = _hold(any_engine, account, 35)
    run_transaction(any_engine, lambda c: ledger.commit(c, spent, 35))  # 5 + 30 of the pack
    running = _hold(any_engine, account, 20)
    done = _void(any_engine, pack.reference)
    assert (done.requested, done.voided, done.shortfall) == (100, 50, 50)
    b = run_transaction(any_engine, lambda c: ledger.get_balance(c, account, "image"))
    assert (b.balance, b.held, b.available) == (20, 20, 0)
    # The job fails: its 20 credits go back to the refunded pack and are voided at once.
    run_transaction(any_engine, lambda c: ledger.release(c, running))
    b = run_transaction(any_engine, lambda c: ledger.get_balance(c, account, "image"))
    assert (b.balance, b.held, b.available) == (0, 0, 0)
    with any_engine.connect() as conn:
        row = conn.execute(select(grants).where(grants.c.reference == pack.reference)).one()
    assert (row.voided, row.void_shortfall, row.remaining) == (70, 30, 0)
    assert other.amount == 5
    assert run_transaction(any_engine, verify) == []


def test_partial_commit_after_void_voids_the_unused_part(any_engine: Engine) -> None:
    account = new_account(any_engine)
    pack = grant(any_engine, account, 10)
    job = _hold(any_engine, account, 8)
    assert _void(any_engine, pack.reference).voided == 2
    run_transaction(any_engine, lambda c: ledger.commit(c, job, 3))  # 5 come back, voided
    b = run_transaction(any_engine, lambda c: ledger.get_balance(c, account, "image"))
    assert (b.balance, b.held, b.available) == (0, 0, 0)
    grant(any_engine, account, 4)  # a later grant is untouched by the old shortfall
    assert available(any_engine, account) == 4
    assert run_transaction(any_engine, verify) == []


def test_void_of_an_expired_grant_is_all_shortfall(any_engine: Engine) -> None:
    account = new_account(any_engine)
    now = utcnow()
    pack = grant(any_engine, account, 10, expires_at=now + timedelta(hours=1), now=now)
    later = now + timedelta(hours=2)
    done = run_transaction(any_engine, lambda c: ledger.void(c, pack.reference, None, now=later))
    assert (done.voided, done.shortfall) == (0, 10)
    assert run_transaction(any_engine, verify) == []


def test_unknown_grant(any_engine: Engine) -> None:
    with pytest.raises(ledger.UnknownGrant):
        _void(any_engine, ref("nope"))
