"""API-key lookups are cached per API process (orchestrator.accounts.KeyCache): a key revoked
in the database keeps working in a process that cached it until the entry expires
(TOLLGATE_API_KEY_CACHE_TTL_S), then gets a 401; `revoke_key` drops it from its own
process's cache at once; the cache is bounded."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import Engine, update

from billing.clock import utcnow
from billing.db import run_transaction
from orchestrator import accounts
from orchestrator.accounts import KeyCache, hash_api_key
from orchestrator.tables import api_keys
from tests.api_helpers import make_account


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_revoked_key_works_until_its_cache_entry_expires_then_gets_401(
    client: TestClient, pg_engine: Engine, made_accounts: list[str]
) -> None:
    clock = Clock()
    app = client.app
    saved = app.state.key_cache  # type: ignore[attr-defined]
    app.state.key_cache = KeyCache(ttl_s=5.0, size_max=100, clock=clock)  # type: ignore[attr-defined]
    try:
        _, headers = make_account(client, made_accounts)
        assert client.get("/v1/balance", headers=headers).status_code == 200  # now cached
        key = headers["Authorization"].removeprefix("Bearer ")
        run_transaction(  # revoked by another process: this one's cache does not know
            pg_engine,
            lambda c: c.execute(
                update(api_keys)
                .where(api_keys.c.key_hash == hash_api_key(key))
                .values(revoked_at=utcnow())
            ),
        )
        clock.now += 4.9
        assert client.get("/v1/balance", headers=headers).status_code == 200  # within TTL
        clock.now += 0.2
        res = client.get("/v1/balance", headers=headers)
        assert res.status_code == 401 and "revoked" in res.json()["detail"]
    finally:
        app.state.key_cache = saved  # type: ignore[attr-defined]


def test_revoke_key_drops_the_key_from_its_cache_and_the_cache_is_bounded(
    client: TestClient, pg_engine: Engine, made_accounts: list[str]
) -> None:
    cache = KeyCache(ttl_s=60.0, size_max=2)
    keys = []
    for _ in range(3):
        new = accounts.create_account(pg_engine, "cache-test", "free")
        made_accounts.append(new.id)
        keys.append(new.api_key)
        assert accounts.authenticate(pg_engine, new.api_key, cache) == new.id
    assert len(cache) == 2 and cache.get(hash_api_key(keys[0])) is None  # the oldest left
    assert accounts.revoke_key(pg_engine, keys[2], cache) is True
    assert cache.get(hash_api_key(keys[2])) is None
    assert accounts.authenticate(pg_engine, keys[2], cache) is None
    assert accounts.revoke_key(pg_engine, keys[2], cache) is False  # already revoked
    assert KeyCache(ttl_s=0, size_max=10).get("x") is None  # TTL 0: nothing is kept
