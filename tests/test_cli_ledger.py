"""The ledger CLI end to end: `python -m orchestrator ...` in a subprocess, against the
session PostgreSQL database and against fresh SQLite files (the embedded default).

Corruption tests run on their own throwaway databases; the session database is only ever
written through the CLI, so its ledger still verifies clean when the session ends."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from billing import ledger
from billing.db import make_engine, run_transaction
from billing.tables import balances, grants
from orchestrator.accounts import account_for_key
from orchestrator.db import upgrade
from tests.conftest import PG_ADMIN_URL, sqlite_url

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 60


def tollgate(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with TOLLGATE_DATABASE_URL=url; never raises on a non-zero exit."""
    env = {**os.environ, "TOLLGATE_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def ok(url: str, *args: str) -> str:
    result = tollgate(url, *args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def bad_input(url: str, *args: str) -> str:
    """Run a command that must be refused with exit 2; the reason (stderr) is returned."""
    result = tollgate(url, *args)
    assert result.returncode == 2, (args, result.returncode, result.stdout, result.stderr)
    assert result.stderr.strip(), "exit 2 without a reason"
    return result.stderr


def create_account(url: str, name: str = "cli-test", plan: str = "free") -> dict[str, str]:
    created = json.loads(ok(url, "accounts", "create", name, "--plan", plan, "--json"))
    assert set(created) == {"id", "api_key"}
    return created


def balance(url: str, account: str) -> dict[str, dict[str, int]]:
    return json.loads(ok(url, "credits", "balance", account, "--json"))


def new_ref() -> str:
    return f"cli-{secrets.token_hex(6)}"


# --- PostgreSQL: the session database -----------------------------------------------------


def test_db_upgrade_is_idempotent_on_a_migrated_database(pg_url: str) -> None:
    assert ok(pg_url, "db", "upgrade").strip() == "database at head"
    assert ok(pg_url, "db", "upgrade").strip() == "database at head"


def test_accounts_create_json_prints_id_and_a_working_api_key(pg_url: str) -> None:
    created = create_account(pg_url, "alice", "business")
    assert created["id"].startswith("acc_")
    assert created["api_key"].startswith("tg_")
    engine = make_engine(pg_url, pool_size=1)
    try:
        row = run_transaction(engine, lambda c: ledger.get_account(c, created["id"]))
        assert (row.name, row.plan) == ("alice", "business")
        owner = run_transaction(engine, lambda c: account_for_key(c, created["api_key"]))
        assert owner == created["id"]
    finally:
        engine.dispose()
    # A new account starts with every kind at zero.
    assert balance(pg_url, created["id"]) == {
        kind: {"balance": 0, "held": 0, "available": 0} for kind in ("image", "tune", "tune_image")
    }


def test_accounts_create_text_output_and_bad_plan(pg_url: str) -> None:
    out = ok(pg_url, "accounts", "create", "bob")
    assert out.startswith("account acc_") and "api key tg_" in out
    assert "Invalid value for '--plan'" in bad_input(
        pg_url, "accounts", "create", "bob", "--plan", "gold"
    )


def test_grant_then_balance(pg_url: str) -> None:
    account = create_account(pg_url)["id"]
    out = ok(pg_url, "credits", "grant", account, "--kind", "image", "--amount", "100")
    assert out.startswith(f"granted 100 image credits to {account} (reference cli-")
    ok(pg_url, "credits", "grant", account, "--kind", "tune", "--amount", "7")
    assert balance(pg_url, account) == {
        "image": {"balance": 100, "held": 0, "available": 100},
        "tune": {"balance": 7, "held": 0, "available": 7},
        "tune_image": {"balance": 0, "held": 0, "available": 0},
    }
    table = ok(pg_url, "credits", "balance", account).splitlines()
    assert table[0].split() == ["kind", "balance", "held", "available"]
    assert table[1].split() == ["image", "100", "0", "100"]


def test_grant_is_idempotent_on_reference(pg_url: str) -> None:
    account = create_account(pg_url)["id"]
    ref = new_ref()
    args = ("credits", "grant", account, "--kind", "image", "--amount", "100", "--reference", ref)
    assert ok(pg_url, *args).startswith("granted 100")
    assert ok(pg_url, *args).startswith("already granted 100")
    assert balance(pg_url, account)["image"] == {"balance": 100, "held": 0, "available": 100}
    # The same reference for a different grant is refused and changes nothing.
    reason = bad_input(
        pg_url, "credits", "grant", account, "--kind", "image", "--amount", "5", "--reference", ref
    )
    assert f"reference {ref!r} already used" in reason
    assert balance(pg_url, account)["image"]["balance"] == 100


def test_grant_with_expiry(pg_url: str) -> None:
    account = create_account(pg_url)["id"]
    future = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    ref = new_ref()
    grant = ("credits", "grant", account, "--kind", "image")
    ok(pg_url, *grant, "--amount", "40", "--expires-at", future, "--reference", ref)
    ok(pg_url, *grant, "--amount", "9", "--expires-at", past)  # born expired: expires at once
    assert balance(pg_url, account)["image"] == {"balance": 40, "held": 0, "available": 40}
    engine = make_engine(pg_url, pool_size=1)
    try:
        with engine.connect() as conn:
            stored = conn.execute(
                select(grants.c.expires_at).where(grants.c.reference == ref)
            ).scalar_one()
        assert stored == datetime.fromisoformat(future)
    finally:
        engine.dispose()


def test_bad_inputs_exit_2_with_a_reason(pg_url: str) -> None:
    account = create_account(pg_url)["id"]
    grant = ("credits", "grant")
    assert "unknown account 'acc_nope'" in bad_input(
        pg_url, *grant, "acc_nope", "--kind", "image", "--amount", "5"
    )
    assert "unknown account 'acc_nope'" in bad_input(pg_url, "credits", "balance", "acc_nope")
    assert "Invalid value for '--kind'" in bad_input(
        pg_url, *grant, account, "--kind", "video", "--amount", "5"
    )
    naive = ("--expires-at", "2030-01-01T00:00:00")
    assert "give a time zone" in bad_input(
        pg_url, *grant, account, "--kind", "image", "--amount", "5", *naive
    )
    assert "not an ISO 8601 time" in bad_input(
        pg_url, *grant, account, "--kind", "image", "--amount", "5", "--expires-at", "tomorrow"
    )
    assert "amount: must be an integer in 1.." in bad_input(
        pg_url, *grant, account, "--kind", "image", "--amount", "0"
    )
    # Nothing was granted by any of the refused commands.
    assert balance(pg_url, account)["image"]["balance"] == 0


def test_credits_void(pg_url: str) -> None:
    account = create_account(pg_url)["id"]
    ref = new_ref()
    ok(pg_url, "credits", "grant", account, "--kind", "image", "--amount", "50", "--reference", ref)
    out = ok(pg_url, "credits", "void", ref, "--amount", "20")
    assert out.startswith(f"voided 20 of 20 image credits of grant {ref} (shortfall 0")
    assert "amount: must be an integer in 1..30" in bad_input(
        pg_url, "credits", "void", ref, "--amount", "31"
    )
    done = json.loads(ok(pg_url, "credits", "void", ref, "--json"))
    assert (done["voided"], done["total_voided"], done["shortfall"]) == (30, 50, 0)
    assert balance(pg_url, account)["image"] == {"balance": 0, "held": 0, "available": 0}
    assert "no grant with reference 'nope'" in bad_input(pg_url, "credits", "void", "nope")


def test_ledger_verify_is_clean_on_the_session_database(pg_url: str) -> None:
    account = create_account(pg_url)["id"]
    ok(pg_url, "credits", "grant", account, "--kind", "image", "--amount", "3")
    result = tollgate(pg_url, "ledger", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ledger ok"


# --- SQLite: the embedded default ---------------------------------------------------------


def test_sqlite_end_to_end(tmp_path: Path) -> None:
    db_file = tmp_path / "fresh" / "tollgate.db"
    url = sqlite_url(db_file)
    assert ok(url, "db", "upgrade").strip() == "database at head"
    assert db_file.exists()
    account = create_account(url, "sqlite-user")["id"]
    ref = new_ref()
    args = ("credits", "grant", account, "--kind", "tune_image", "--amount", "100")
    ok(url, *args, "--reference", ref)
    ok(url, *args, "--reference", ref)
    assert balance(url, account)["tune_image"] == {"balance": 100, "held": 0, "available": 100}
    assert "unknown account" in bad_input(url, "credits", "balance", "acc_missing")
    assert ok(url, "ledger", "verify").strip() == "ledger ok"


# --- corrupted ledgers, each on its own throwaway database --------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def throwaway_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh migrated database that a test may corrupt; never the session database."""
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "corrupt.db")
        upgrade(url)
        yield url
        return
    name = f"tollgate_cli_corrupt_{os.getpid()}_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_ledger_verify_names_each_violation(throwaway_url: str) -> None:
    url = throwaway_url
    account = create_account(url)["id"]
    ok(url, "credits", "grant", account, "--kind", "image", "--amount", "100", "--reference", "g1")
    ok(url, "credits", "grant", account, "--kind", "tune", "--amount", "10", "--reference", "g2")
    engine = make_engine(url, pool_size=1)
    try:
        run_transaction(
            engine,
            lambda c: ledger.hold(c, account, "image", 30, reference="h1", ttl_s=600),
        )
        run_transaction(engine, lambda c: ledger.commit(c, "h1", 20))
        assert ok(url, "ledger", "verify").strip() == "ledger ok"
        with engine.begin() as conn:
            # A cached balance that no entry explains.
            conn.execute(
                balances.update()
                .where(balances.c.account_id == account, balances.c.kind == "image")
                .values(balance=balances.c.balance + 5)
            )
            # A committed hold flipped back to open.
            conn.execute(text("UPDATE holds SET status = 'open' WHERE reference = 'h1'"))
            # Credits appearing in a grant out of nowhere.
            conn.execute(text("UPDATE grants SET remaining = remaining + 1 WHERE reference = 'g1'"))
            # A void recorded on a grant without its entry, and more than the grant.
            conn.execute(
                text("UPDATE grants SET voided = 4, void_shortfall = 99 WHERE reference = 'g2'")
            )
    finally:
        engine.dispose()
    result = tollgate(url, "ledger", "verify")
    assert result.returncode == 1, result.stdout + result.stderr
    violations = [line for line in result.stdout.splitlines() if line.startswith("VIOLATION ")]
    where = f"{account}/image"
    expected = [
        f"{where}: cached balance 85 != sum of entries 80",
        f"{where}: held 0 != open holds 30",
        "grant g1: amount 100 != remaining 81 + expired 0 + voided 0 + reserved/consumed 30",
        f"{where}: balance - held = 85 != grants' remaining 81",
        "hold h1: status open with 1 resolution entries",
        "hold h1: open hold has committed 20",
        "grant g2: amount 10 != remaining 10 + expired 0 + voided 4 + reserved/consumed 0",
        "grant g2: voided 4 + shortfall 99 outside 0..10",
        "grant g2: void entries 0 != voided 4",
    ]
    for message in expected:
        assert f"VIOLATION {message}" in violations, (message, violations)
    assert "ledger ok" not in result.stdout
    assert f"{len(violations)} ledger invariant violation(s)" in result.stderr
