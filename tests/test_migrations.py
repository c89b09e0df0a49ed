"""Migrations on a throwaway PostgreSQL database: head -> 0004 -> head, with the ledger's
functions holding, committing and expiring grants correctly at head before and after the
round trip (0005 only changes when the grant-expiry statement runs; 0009 adds the void
columns the code at head reads, so the code is exercised at head only, and at 0004 the
schema and the functions are checked to be 0004's)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from billing import ledger
from billing.clock import utcnow
from billing.db import make_engine, run_transaction
from billing.verify import verify
from orchestrator.db import alembic_config, upgrade
from tests.conftest import PG_ADMIN_URL, _pg_url_for
from tests.ledger_helpers import grant, new_account, ref


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    name = f"tollgate_migrations_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield _pg_url_for(name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def exercise_ledger(url: str) -> None:
    """A hold and commit, and a grant expiring under an open hold, then verify."""
    engine = make_engine(url, pool_size=1)
    try:
        account = new_account(engine)
        now = utcnow()
        grant(engine, account, 10, expires_at=now + timedelta(hours=1), now=now)
        lasting = grant(engine, account, 5)  # never expires
        first, second = ref("job"), ref("job")
        run_transaction(
            engine,
            lambda c: ledger.hold(c, account, "image", 4, reference=first, ttl_s=600, now=now),
        )
        run_transaction(engine, lambda c: ledger.commit(c, first, 3, now=now))
        run_transaction(
            engine,
            lambda c: ledger.hold(c, account, "image", 6, reference=second, ttl_s=600, now=now),
        )
        later = now + timedelta(hours=2)  # the 10-credit grant has expired by now
        run_transaction(engine, lambda c: ledger.release(c, second, now=later))
        balance = run_transaction(
            engine, lambda c: ledger.get_balance(c, account, "image", now=later)
        )
        # 15 granted, 3 spent; of the expiring grant's 7 left, 6 were reserved and came back
        # after it expired, so all 7 expired: 5 left, all from the never-expiring grant.
        assert (balance.balance, balance.held, balance.available) == (5, 0, 5)
        # A void while 3 of those 5 are held: 2 go now, the 3 when the hold gives them back
        # (0009's PL/pgSQL resolution).
        third = ref("job")
        run_transaction(
            engine,
            lambda c: ledger.hold(c, account, "image", 3, reference=third, ttl_s=600, now=later),
        )
        done = run_transaction(engine, lambda c: ledger.void(c, lasting.reference, now=later))
        assert (done.voided, done.shortfall) == (2, 3)
        run_transaction(engine, lambda c: ledger.release(c, third, now=later))
        balance = run_transaction(
            engine, lambda c: ledger.get_balance(c, account, "image", now=later)
        )
        assert (balance.balance, balance.held, balance.available) == (0, 0, 0)
        assert run_transaction(engine, verify) == []
    finally:
        engine.dispose()


def assert_verifies_without_voids(url: str) -> None:
    """At 0004 the voids made at head are expiries, and the ledger still adds up."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            types = set(conn.execute(text("SELECT DISTINCT type FROM entries")).scalars())
            problems = conn.execute(
                text(
                    "SELECT count(*) FROM grants g WHERE g.remaining + g.expired +"
                    " coalesce((SELECT sum(CASE WHEN h.status = 'open' THEN a.amount"
                    " ELSE a.committed END) FROM hold_allocations a JOIN holds h"
                    " ON h.id = a.hold_id WHERE a.grant_id = g.id), 0) <> g.amount"
                )
            ).scalar_one()
            sums = conn.execute(
                text(
                    "SELECT count(*) FROM balances b WHERE b.balance <> (SELECT"
                    " coalesce(sum(delta_balance), 0) FROM entries e WHERE"
                    " e.account_id = b.account_id AND e.kind = b.kind)"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    assert "void" not in types
    assert (problems, sums) == (0, 0)


def test_upgrade_downgrade_upgrade_keeps_the_ledger_working(fresh_pg_url: str) -> None:
    upgrade(fresh_pg_url)
    exercise_ledger(fresh_pg_url)
    command.downgrade(alembic_config(fresh_pg_url), "0004")
    engine = create_engine(fresh_pg_url)
    try:
        with engine.connect() as conn:
            columns = {
                r[0]
                for r in conn.execute(
                    text(
                        "SELECT column_name FROM information_schema.columns"
                        " WHERE table_name = 'grants'"
                    )
                )
            }
            body = conn.execute(
                text("SELECT prosrc FROM pg_proc WHERE proname = 'tollgate_ledger_resolve'")
            ).scalar_one()
            tables = set(conn.execute(text("SELECT tablename FROM pg_tables")).scalars())
    finally:
        engine.dispose()
    assert "voided" not in columns and "void_shortfall" not in columns
    assert "void_shortfall" not in body and "IF EXISTS" not in body  # 0003's function
    assert not tables & {
        "payment_events",
        "payment_grants",
        "pending_refunds",
        "subscriptions",
        "balance_alerts",
    }
    assert_verifies_without_voids(fresh_pg_url)
    upgrade(fresh_pg_url)
    exercise_ledger(fresh_pg_url)
