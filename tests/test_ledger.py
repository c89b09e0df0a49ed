"""Ledger behaviour on PostgreSQL and SQLite: grants, burn order, holds, resolutions."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, select

from billing import (
    HoldAlreadyResolved,
    InsufficientCredits,
    InvalidAmount,
    ReferenceConflict,
    UnknownAccount,
    UnknownHold,
    ledger,
)
from billing.clock import utcnow
from billing.db import run_transaction
from billing.tables import grants
from billing.verify import verify
from tests.ledger_helpers import available, grant, new_account, ref


def run(engine: Engine, fn):  # type: ignore[no-untyped-def]
    return run_transaction(engine, fn)


def test_grant_is_idempotent_on_reference(any_engine: Engine) -> None:
    acc = new_account(any_engine)
    r = ref()
    first = grant(any_engine, acc, 10, reference=r)
    again = grant(any_engine, acc, 10, reference=r)
    assert first.created and not again.created and first.id == again.id
    assert available(any_engine, acc) == 10
    with pytest.raises(ReferenceConflict):
        grant(any_engine, acc, 11, reference=r)
    other = new_account(any_engine)
    with pytest.raises(ReferenceConflict):
        grant(any_engine, other, 10, reference=r)


def test_hold_commit_release_exactly_once(any_engine: Engine) -> None:
    acc = new_account(any_engine)
    grant(any_engine, acc, 10)
    h = ref("job")
    held = run(any_engine, lambda c: ledger.hold(c, acc, "image", 4, reference=h, ttl_s=60))
    assert held.status == "open"
    assert run(any_engine, lambda c: ledger.hold(c, acc, "image", 4, reference=h, ttl_s=60)) == held
    b = run(any_engine, lambda c: ledger.get_balance(c, acc, "image"))
    assert (b.balance, b.held, b.available) == (10, 4, 6)
    done = run(any_engine, lambda c: ledger.commit(c, h, 3))
    assert (done.status, done.committed, done.released) == ("committed", 3, 1)
    with pytest.raises(HoldAlreadyResolved):
        run(any_engine, lambda c: ledger.commit(c, h, 3))
    with pytest.raises(HoldAlreadyResolved):
        run(any_engine, lambda c: ledger.release(c, h))
    b = run(any_engine, lambda c: ledger.get_balance(c, acc, "image"))
    assert (b.balance, b.held, b.available) == (7, 0, 7)
    h2 = ref("job")
    run(any_engine, lambda c: ledger.hold(c, acc, "image", 7, reference=h2, ttl_s=60))
    run(any_engine, lambda c: ledger.release(c, h2))
    assert available(any_engine, acc) == 7
    assert run(any_engine, verify) == []


def test_insufficient_credits_carries_needed_and_available(any_engine: Engine) -> None:
    acc = new_account(any_engine)
    grant(any_engine, acc, 3)
    with pytest.raises(InsufficientCredits) as info:
        run(any_engine, lambda c: ledger.hold(c, acc, "image", 5, reference=ref(), ttl_s=60))
    assert (info.value.needed, info.value.available, info.value.kind) == (5, 3, "image")
    # Kinds are separate purses.
    with pytest.raises(InsufficientCredits):
        run(any_engine, lambda c: ledger.hold(c, acc, "tune", 1, reference=ref(), ttl_s=60))


def test_commit_more_than_held_is_refused(any_engine: Engine) -> None:
    acc = new_account(any_engine)
    grant(any_engine, acc, 5)
    h = ref()
    run(any_engine, lambda c: ledger.hold(c, acc, "image", 2, reference=h, ttl_s=60))
    with pytest.raises(InvalidAmount):
        run(any_engine, lambda c: ledger.commit(c, h, 3))
    assert run(any_engine, lambda c: ledger.get_hold(c, h)).status == "open"  # type: ignore[union-attr]


def test_burn_order_soonest_expiring_first_never_expiring_last(any_engine: Engine) -> None:
    now = utcnow()
    acc = new_account(any_engine)
    forever = grant(any_engine, acc, 5, now=now)
    late = grant(any_engine, acc, 5, expires_at=now + timedelta(days=30), now=now)
    soon = grant(any_engine, acc, 5, expires_at=now + timedelta(days=1), now=now)
    h = ref()
    run(any_engine, lambda c: ledger.hold(c, acc, "image", 7, reference=h, ttl_s=60, now=now))
    run(any_engine, lambda c: ledger.commit(c, h, 7, now=now))
    left = dict(
        run(
            any_engine,
            lambda c: c.execute(
                select(grants.c.id, grants.c.remaining).where(grants.c.account_id == acc)
            ).all(),
        )
    )
    assert left == {soon.id: 0, late.id: 3, forever.id: 5}


def test_expired_grant_is_never_consumed(any_engine: Engine) -> None:
    now = utcnow()
    acc = new_account(any_engine)
    grant(any_engine, acc, 5, expires_at=now + timedelta(hours=1), now=now)
    later = now + timedelta(hours=2)
    assert available(any_engine, acc, now=later) == 0
    with pytest.raises(InsufficientCredits):
        run(
            any_engine,
            lambda c: ledger.hold(c, acc, "image", 1, reference=ref(), ttl_s=60, now=later),
        )
    assert run(any_engine, lambda c: ledger.expire_grants(c, now=later)) >= 5
    b = run(any_engine, lambda c: ledger.get_balance(c, acc, "image", now=later))
    assert (b.balance, b.held) == (0, 0)
    assert run(any_engine, verify) == []


def test_reserved_credits_survive_their_grant_expiring(any_engine: Engine) -> None:
    now = utcnow()
    acc = new_account(any_engine)
    grant(any_engine, acc, 5, expires_at=now + timedelta(hours=1), now=now)
    h1, h2 = ref(), ref()
    run(any_engine, lambda c: ledger.hold(c, acc, "image", 3, reference=h1, ttl_s=86400, now=now))
    run(any_engine, lambda c: ledger.hold(c, acc, "image", 2, reference=h2, ttl_s=86400, now=now))
    later = now + timedelta(hours=2)
    run(any_engine, lambda c: ledger.expire_grants(c, now=later))
    done = run(any_engine, lambda c: ledger.commit(c, h1, 3, now=later))
    assert done.committed == 3  # reserved credits were not lost to the expiry
    # Credits a release gives back to an expired grant expire with it.
    run(any_engine, lambda c: ledger.release(c, h2, now=later))
    b = run(any_engine, lambda c: ledger.get_balance(c, acc, "image", now=later))
    assert (b.balance, b.held, b.available) == (0, 0, 0)
    assert run(any_engine, verify) == []


def test_hold_expiry_by_sweeper(any_engine: Engine) -> None:
    now = utcnow()
    acc = new_account(any_engine)
    grant(any_engine, acc, 5, now=now)
    h = ref()
    run(any_engine, lambda c: ledger.hold(c, acc, "image", 5, reference=h, ttl_s=30, now=now))
    with pytest.raises(InvalidAmount):
        run(any_engine, lambda c: ledger.expire(c, h, now=now))
    later = now + timedelta(seconds=31)
    assert h in run(any_engine, lambda c: ledger.due_holds(c, later))
    assert run(any_engine, lambda c: ledger.expire(c, h, now=later)).status == "expired"
    with pytest.raises(HoldAlreadyResolved):
        run(any_engine, lambda c: ledger.commit(c, h, 5, now=later))
    assert available(any_engine, acc, now=later) == 5


def test_unknowns_and_bad_amounts(any_engine: Engine) -> None:
    with pytest.raises(UnknownAccount):
        grant(any_engine, "acc_missing", 5)
    with pytest.raises(UnknownHold):
        run(any_engine, lambda c: ledger.release(c, "no-such-hold"))
    acc = new_account(any_engine)
    with pytest.raises(InvalidAmount):
        grant(any_engine, acc, 0)
    with pytest.raises(InvalidAmount):
        run(any_engine, lambda c: ledger.hold(c, acc, "image", -1, reference=ref(), ttl_s=60))
    with pytest.raises(InvalidAmount):
        run(any_engine, lambda c: ledger.hold(c, acc, "gold", 1, reference=ref(), ttl_s=60))


def test_verify_names_each_violation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import update

    from billing.db import make_engine
    from billing.tables import balances, holds
    from orchestrator.db import upgrade

    url = f"sqlite:///{tmp_path / 'corrupt.db'}"
    upgrade(url)
    engine = make_engine(url)
    acc = new_account(engine)
    grant(engine, acc, 10)
    h = ref()
    run(engine, lambda c: ledger.hold(c, acc, "image", 4, reference=h, ttl_s=60))
    run(engine, lambda c: ledger.commit(c, h, 4))
    assert run(engine, verify) == []
    run(
        engine,
        lambda c: c.execute(
            update(balances)
            .where(balances.c.account_id == acc, balances.c.kind == "image")
            .values(balance=50)
        ),
    )
    run(engine, lambda c: c.execute(update(holds).values(committed=2)))
    problems = run(engine, verify)
    assert any("cached balance 50 != sum of entries 6" in p for p in problems)
    assert any(f"hold {h}: entries charged 4 != committed 2" in p for p in problems)
    engine.dispose()
