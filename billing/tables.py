"""The ledger's tables (SQLAlchemy Core). One MetaData for the whole project: the
orchestrator adds its tables to `metadata` so foreign keys and migrations stay in one place.

Money columns are integers (credits). Timestamps are stored as naive UTC and read back as
aware UTC on every backend (SQLite has no time zones).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)

# Integer primary keys that autoincrement on SQLite too (SQLite only does it for INTEGER).
BigId = BigInteger().with_variant(Integer, "sqlite")

REFERENCE_MAX_LEN = 200
ACCOUNT_ID_MAX_LEN = 40


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


accounts = Table(
    "accounts",
    metadata,
    Column("id", String(ACCOUNT_ID_MAX_LEN), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("plan", String(20), nullable=False),
    # When a paid plan stopped being active (retention clocks start here); NULL while active.
    Column("plan_lapsed_at", UTCDateTime, nullable=True),
    # A paid plan that ends at this time (a canceled subscription's period end); the beat
    # sweep lapses it then. NULL: nothing scheduled.
    Column("plan_lapses_at", UTCDateTime, nullable=True),
    # Where account-level webhooks (balance.low) are POSTed, signed like job callbacks.
    Column("webhook_url", String(2000), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    CheckConstraint("plan IN ('free', 'standard', 'business')", name="plan"),
)

# One row per (account, kind): the cached sums of entries, and the row every mutation of
# that account's credits of that kind locks first.
balances = Table(
    "balances",
    metadata,
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), ForeignKey("accounts.id"), primary_key=True),
    Column("kind", String(20), primary_key=True),
    Column("balance", BigInteger, nullable=False, server_default=text("0")),
    Column("held", BigInteger, nullable=False, server_default=text("0")),
    CheckConstraint("kind IN ('image', 'tune', 'tune_image')", name="kind"),
    CheckConstraint("held >= 0", name="held_nonneg"),
    CheckConstraint("balance >= held", name="no_overdraw"),
)

grants = Table(
    "grants",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), ForeignKey("accounts.id"), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("source", String(20), nullable=False),
    Column("amount", BigInteger, nullable=False),
    # Credits neither reserved by a hold, consumed by a commit, nor expired.
    Column("remaining", BigInteger, nullable=False),
    Column("expired", BigInteger, nullable=False, server_default=text("0")),
    # Voided (a refund): credits taken out of `remaining`. `void_shortfall`: credits a void
    # asked for that were not there (spent, expired, or held: held ones are voided when
    # their hold gives them back).
    Column("voided", BigInteger, nullable=False, server_default=text("0")),
    Column("void_shortfall", BigInteger, nullable=False, server_default=text("0")),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("reference", String(REFERENCE_MAX_LEN), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("reference"),
    CheckConstraint("source IN ('purchase', 'plan', 'promo', 'adjustment')", name="source"),
    CheckConstraint("amount > 0", name="amount_pos"),
    CheckConstraint("remaining >= 0 AND remaining <= amount", name="remaining_range"),
    CheckConstraint("expired >= 0", name="expired_nonneg"),
    CheckConstraint("voided >= 0", name="voided_nonneg"),
    CheckConstraint("void_shortfall >= 0", name="void_shortfall_nonneg"),
    Index("ix_grants_account_kind", "account_id", "kind"),
)

holds = Table(
    "holds",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("reference", String(REFERENCE_MAX_LEN), nullable=False),
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), ForeignKey("accounts.id"), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("status", String(20), nullable=False),
    Column("committed", BigInteger, nullable=False, server_default=text("0")),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("resolved_at", UTCDateTime, nullable=True),
    UniqueConstraint("reference"),
    CheckConstraint("status IN ('open', 'committed', 'released', 'expired')", name="status"),
    CheckConstraint("amount > 0", name="amount_pos"),
    CheckConstraint("committed >= 0 AND committed <= amount", name="committed_range"),
    Index("ix_holds_open_deadline", "status", "expires_at"),
)

# Which grants a hold's credits were reserved from, and how many of them were consumed.
hold_allocations = Table(
    "hold_allocations",
    metadata,
    Column("hold_id", BigId, ForeignKey("holds.id"), primary_key=True),
    Column("grant_id", BigId, ForeignKey("grants.id"), primary_key=True),
    Column("amount", BigInteger, nullable=False),
    Column("committed", BigInteger, nullable=False, server_default=text("0")),
    CheckConstraint("amount > 0", name="amount_pos"),
    CheckConstraint("committed >= 0 AND committed <= amount", name="committed_range"),
)

ENTRY_TYPES = ("grant", "hold", "commit", "release", "expire_hold", "expire_grant", "void")
RESOLUTION_TYPES = ("commit", "release", "expire_hold")

# Append-only. balance = sum(delta_balance), held = sum(delta_held), per account and kind.
entries = Table(
    "entries",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), ForeignKey("accounts.id"), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("type", String(20), nullable=False),
    Column("delta_balance", BigInteger, nullable=False),
    Column("delta_held", BigInteger, nullable=False),
    Column("grant_id", BigId, ForeignKey("grants.id"), nullable=True),
    Column("hold_id", BigId, ForeignKey("holds.id"), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    CheckConstraint(
        "type IN ('grant', 'hold', 'commit', 'release', 'expire_hold', 'expire_grant', 'void')",
        name="type",
    ),
    Index("ix_entries_account_id", "account_id", "id"),
    # A hold is resolved at most once, whatever the code above does.
    Index(
        "uq_entries_hold_resolution",
        "hold_id",
        unique=True,
        postgresql_where=text("type IN ('commit', 'release', 'expire_hold')"),
        sqlite_where=text("type IN ('commit', 'release', 'expire_hold')"),
    ),
)
