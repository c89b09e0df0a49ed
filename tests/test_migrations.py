"""Migrations on a throwaway PostgreSQL database: head -> 0004 -> head, with the ledger's
functions holding, committing and expiring grants correctly at both ends (0005 only changes
when the grant-expiry statement runs)."""

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
        grant(engine, account, 5)  # never expires
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
        assert run_transaction(engine, verify) == []
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_keeps_the_ledger_working(fresh_pg_url: str) -> None:
    upgrade(fresh_pg_url)
    exercise_ledger(fresh_pg_url)
    command.downgrade(alembic_config(fresh_pg_url), "0004")
    exercise_ledger(fresh_pg_url)
    upgrade(fresh_pg_url)
    exercise_ledger(fresh_pg_url)
