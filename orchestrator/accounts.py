"""Accounts and API keys (service layer: each function is one transaction).

`KeyCache`: an API process remembers the account of a key it has looked up for
`api_key_cache_ttl_s` seconds (at most `api_key_cache_max` keys, least recently used out
first), so most requests skip the lookup's transaction. Only keys found are cached; a key
revoked in the database keeps working in a process that cached it until its entry expires
(`revoke_key` drops it at once from the cache it is given)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, insert, select, update

from billing import ledger
from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator.tables import api_keys
from orchestrator.ttl_cache import TtlCache

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


def account_for_hash(conn: Connection, key_hash: str) -> str | None:
    return conn.execute(
        select(api_keys.c.account_id).where(
            api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None)
        )
    ).scalar_one_or_none()


def account_for_key(conn: Connection, api_key: str) -> str | None:
    """The account an API key belongs to, or None (unknown or revoked)."""
    return account_for_hash(conn, hash_api_key(api_key))


# Key hash -> account id. Thread-safe (the API's request threads share one).
KeyCache = TtlCache[str]


def authenticate(engine: Engine, api_key: str, cache: KeyCache | None = None) -> str | None:
    """The account of `api_key` (None: unknown or revoked), from `cache` while it holds the
    key, else from the database (one read-only transaction; what it finds is cached)."""
    key_hash = hash_api_key(api_key)
    if cache is not None:
        found = cache.get(key_hash)
        if found is not None:
            return found
    account_id = run_transaction(engine, lambda conn: account_for_hash(conn, key_hash))
    if account_id is not None and cache is not None:
        cache.put(key_hash, account_id)
    return account_id


def revoke_key(engine: Engine, api_key: str, cache: KeyCache | None = None) -> bool:
    """Revoke an API key (False: unknown or revoked already). Other processes' caches
    still accept it until their entries expire (api_key_cache_ttl_s)."""
    key_hash = hash_api_key(api_key)

    def work(conn: Connection) -> bool:
        done = conn.execute(
            update(api_keys)
            .where(api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        return bool(done.rowcount)

    revoked = run_transaction(engine, work)
    if cache is not None:
        cache.forget(key_hash)
    return revoked
