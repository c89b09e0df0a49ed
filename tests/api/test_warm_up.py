"""The API opens its first database connection at start, before any request needs it (the
first POST after a start used to pay for it, and the requests queued behind it waited)."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from orchestrator import db
from orchestrator.api.app import create_app


def test_the_first_database_connection_is_open_before_the_first_request(
    settings_env: None,
) -> None:
    db.engine_for.cache_clear()  # a fresh engine: no connection yet
    engine = db.get_engine()
    assert engine.pool.checkedin() == 0
    with TestClient(create_app()):  # starts the app (its lifespan), sends no request
        deadline = time.monotonic() + 10
        while engine.pool.checkedin() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.pool.checkedin() == 1
    db.engine_for.cache_clear()
    engine.dispose()
