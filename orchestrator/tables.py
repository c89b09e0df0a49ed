"""The orchestrator's tables, on billing's MetaData (one schema, one migration history)."""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, String, Table, UniqueConstraint

from billing.tables import ACCOUNT_ID_MAX_LEN, BigId, UTCDateTime, metadata

# API keys are stored as SHA-256 hex digests; the key itself is shown once, at creation.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), ForeignKey("accounts.id"), nullable=False),
    Column("key_hash", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    UniqueConstraint("key_hash"),
)
