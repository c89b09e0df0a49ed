"""billing: voids, payment events and grants, subscriptions, low-balance alerts

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 21:30:00.000000

- grants.voided / grants.void_shortfall and the `void` entry type (billing.voids);
- accounts.plan_lapses_at (a canceled subscription's period end) and accounts.webhook_url;
- payment_events (each provider event once), payment_grants (payment -> grants it bought),
  pending_refunds (a refund that came before its purchase), subscriptions, balance_alerts;
- PostgreSQL: tollgate_ledger_resolve re-created from 0005's text with one more guarded
  statement at the end: credits a resolution gives back to a grant with a void shortfall
  are voided (what billing.locked.void_owed_locked does on the Python path). The guard is an
  index lookup on the account's grants, like 0005's expiry guard. Downgrade restores 0005's
  and turns voids into expiries (void entries -> expire_grant, voided -> expired).
"""

import importlib.util
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TYPES_OLD = "type IN ('grant', 'hold', 'commit', 'release', 'expire_hold', 'expire_grant')"
TYPES_NEW = "type IN ('grant', 'hold', 'commit', 'release', 'expire_hold', 'expire_grant', 'void')"

# Appended to the resolution (after 0005's guarded expiry, a new statement, so it sees the
# credits given back and what expired). Mirrors billing.locked.void_owed_locked.
VOID_OWED = """
    -- Credits given back to a grant refunded while they were reserved are voided now.
    IF EXISTS (
        SELECT 1 FROM grants
        WHERE account_id = v_hold.account_id AND kind = v_hold.kind
          AND void_shortfall > 0 AND remaining > 0
    ) THEN
        WITH owed AS (
            UPDATE grants AS g
            SET remaining = g.remaining - o.n, voided = g.voided + o.n,
                void_shortfall = g.void_shortfall - o.n
            FROM (
                SELECT id, least(remaining, void_shortfall) AS n FROM grants
                WHERE account_id = v_hold.account_id AND kind = v_hold.kind
                  AND void_shortfall > 0 AND remaining > 0
            ) AS o
            WHERE g.id = o.id
            RETURNING g.id, o.n
        ), owed_entries AS (
            INSERT INTO entries
                (account_id, kind, type, delta_balance, delta_held, grant_id, created_at)
            SELECT v_hold.account_id, v_hold.kind, 'void', -owed.n, 0, owed.id, p_now FROM owed
        ), owed_total AS (
            SELECT sum(n) AS n FROM owed
        )
        UPDATE balances SET balance = balance - owed_total.n
        FROM owed_total
        WHERE account_id = v_hold.account_id AND kind = v_hold.kind AND owed_total.n > 0;
    END IF;
"""
RESOLVE_TAIL = "\n    r_status := p_status;\n    r_committed := p_committed;\nEND\n"


def _migration_0005() -> ModuleType:
    path = Path(__file__).with_name("0005_ledger_expiry_guard.py")
    spec = importlib.util.spec_from_file_location("tollgate_migration_0005", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolve_with_void() -> str:
    _, resolve = _migration_0005().guarded_functions()
    if resolve.count(RESOLVE_TAIL) != 1:
        raise RuntimeError("migration 0009: expected one resolution tail in 0005's text")
    return resolve.replace(RESOLVE_TAIL, VOID_OWED + RESOLVE_TAIL)


def upgrade() -> None:
    with op.batch_alter_table("grants") as batch:
        batch.add_column(
            sa.Column("voided", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
        )
        batch.add_column(
            sa.Column(
                "void_shortfall", sa.BigInteger(), server_default=sa.text("0"), nullable=False
            )
        )
        batch.create_check_constraint(op.f("ck_grants_voided_nonneg"), "voided >= 0")
        batch.create_check_constraint(
            op.f("ck_grants_void_shortfall_nonneg"), "void_shortfall >= 0"
        )
    with op.batch_alter_table("entries") as batch:
        batch.drop_constraint(op.f("ck_entries_type"), type_="check")
        batch.create_check_constraint(op.f("ck_entries_type"), TYPES_NEW)
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("plan_lapses_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("webhook_url", sa.String(length=2000), nullable=True))
    op.create_table(
        "payment_events",
        sa.Column("provider", sa.String(length=20), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("outcome", sa.String(length=40), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("provider", "event_id", name=op.f("pk_payment_events")),
    )
    op.create_table(
        "payment_grants",
        sa.Column("provider", sa.String(length=20), nullable=False),
        sa.Column("payment_id", sa.String(length=200), nullable=False),
        sa.Column("grant_reference", sa.String(length=200), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_payment_grants_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint(
            "provider", "payment_id", "grant_reference", name=op.f("pk_payment_grants")
        ),
    )
    op.create_table(
        "pending_refunds",
        sa.Column("provider", sa.String(length=20), nullable=False),
        sa.Column("payment_id", sa.String(length=200), nullable=False),
        sa.Column("refunded", sa.BigInteger(), nullable=False),
        sa.Column("paid", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("provider", "payment_id", name=op.f("pk_pending_refunds")),
    )
    op.create_table(
        "subscriptions",
        sa.Column("provider", sa.String(length=20), nullable=False),
        sa.Column("subscription_id", sa.String(length=200), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("plan", sa.String(length=20), nullable=True),
        sa.Column("status", sa.String(length=40), nullable=False),
        sa.Column("current_period_end", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_subscriptions_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("provider", "subscription_id", name=op.f("pk_subscriptions")),
    )
    op.create_table(
        "balance_alerts",
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("threshold", sa.BigInteger(), nullable=False),
        sa.Column("armed", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_balance_alerts_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("account_id", "kind", name=op.f("pk_balance_alerts")),
    )
    if op.get_context().dialect.name == "postgresql":
        op.execute(resolve_with_void())


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        _, resolve = _migration_0005().guarded_functions()
        op.execute(resolve)
    op.drop_table("balance_alerts")
    op.drop_table("subscriptions")
    op.drop_table("pending_refunds")
    op.drop_table("payment_grants")
    op.drop_table("payment_events")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("webhook_url")
        batch.drop_column("plan_lapses_at")
    # 0005 has no voids: voided credits become expired ones (both are gone for good), so
    # the ledger still verifies; the shortfalls are dropped.
    op.execute("UPDATE entries SET type = 'expire_grant' WHERE type = 'void'")
    op.execute("UPDATE grants SET expired = expired + voided WHERE voided > 0")
    with op.batch_alter_table("entries") as batch:
        batch.drop_constraint(op.f("ck_entries_type"), type_="check")
        batch.create_check_constraint(op.f("ck_entries_type"), TYPES_OLD)
    with op.batch_alter_table("grants") as batch:
        batch.drop_constraint(op.f("ck_grants_voided_nonneg"), type_="check")
        batch.drop_constraint(op.f("ck_grants_void_shortfall_nonneg"), type_="check")
        batch.drop_column("void_shortfall")
        batch.drop_column("voided")
