"""Accounts and API keys (service layer: each function is one transaction)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, insert, select

from billing import ledger
from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.tables import api_keys

API_KEY_PREFIX = "tg_"
API_KEY_BYTES = 32


@dataclass(frozen=True)
class NewAccount:
    id: str
    api_key: str


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(API_KEY_BYTES)


def _add_key(conn: Connection, account_id: str) -> str:
    api_key = new_api_key()
    conn.execute(
        insert(api_keys).values(
            account_id=account_id, key_hash=hash_api_key(api_key), created_at=utcnow()
        )
    )
    return api_key


def create_account(engine: Engine, name: str, plan: str) -> NewAccount:
    def work(conn: Connection) -> NewAccount:
        account_id = ledger.create_account(conn, name, plan)
        return NewAccount(account_id, _add_key(conn, account_id))

    return run_transaction(engine, work)


def account_for_key(conn: Connection, api_key: str) -> str | None:
    """The account an API key belongs to, or None (unknown or revoked)."""
    return conn.execute(
        select(api_keys.c.account_id).where(
            api_keys.c.key_hash == hash_api_key(api_key), api_keys.c.revoked_at.is_(None)
        )
    ).scalar_one_or_none()
