"""Schemathesis against /openapi.json, on the real app and real PostgreSQL: every route, as a
user and as the admin, positive and negative examples. Any 5xx, a response that breaks its
documented schema, or an undocumented status code fails the test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Final

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks

from tests.api_helpers import ADMIN, Headers, make_account

pytestmark = pytest.mark.slow

# Examples per route and role: 18 routes x 2 roles x this, about 60-90 s on 2 cores.
EXAMPLES_PER_ROUTE: Final = 100
CHECKS: Final = [
    checks.not_a_server_error,
    checks.response_schema_conformance,
    checks.status_code_conformance,
]
# Routes whose answer is not JSON with a schema (the docs pages, Prometheus text).
SKIPPED_PATHS: Final = ("/docs", "/redoc", "/docs/oauth2-redirect", "/metrics")


@pytest.fixture(scope="module")
def app(client: TestClient) -> FastAPI:
    found: FastAPI = client.app  # type: ignore[assignment]
    return found


@pytest.fixture(scope="module")
def schema(app: FastAPI) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _operations(schema: Any) -> Iterator[Any]:
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path not in SKIPPED_PATHS:
            yield operation


def _fuzz(schema: Any, headers: Headers) -> list[str]:
    """Run every operation; returns the labels of those that were exercised."""
    seen = []
    for operation in _operations(schema):
        strategy = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )

        @settings(
            max_examples=EXAMPLES_PER_ROUTE,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case: Any) -> None:
            case.headers = {**(case.headers or {}), **headers}
            case.call_and_validate(checks=CHECKS)

        run()
        seen.append(operation.label)
    return seen


@pytest.mark.parametrize("role", ["user", "admin"])
def test_fuzz_every_route(
    role: str, schema: Any, client: TestClient, made_accounts: list[str]
) -> None:
    if role == "admin":
        headers = dict(ADMIN)
    else:
        _, headers = make_account(client, made_accounts, credits=5)
    started = time.monotonic()
    seen = _fuzz(schema, headers)
    assert len(seen) >= 15, seen  # every product route was exercised
    assert any("/v1/jobs" in label for label in seen)
    print(f"fuzzed {len(seen)} routes as {role} in {time.monotonic() - started:.0f} s")
