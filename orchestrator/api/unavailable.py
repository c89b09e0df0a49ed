"""503 with Retry-After while PostgreSQL or Redis is unreachable, never a 500.

A request spends at most API_RETRY_BUDGET_S retrying transient faults (run_transaction reads
the budget from the request's context, which `FaultBudget` sets); a fault that outlasts it
answers 503 with `Retry-After` and a JSON body naming the dependency. The engine invalidates
its pool on a disconnect, so the first request after the service is back gets a new
connection and succeeds. Every route documents the 503 through `UNAVAILABLE_RESPONSES`.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError
from starlette.types import ASGIApp, Receive, Scope, Send

from billing.db import transient_budget
from orchestrator.faults import (
    API_RETRY_AFTER_S,
    API_RETRY_BUDGET_S,
    REDIS_TRANSIENT_ERRORS,
    dependency_of,
    process_scope,
)

log = logging.getLogger(__name__)


class UnavailableOut(BaseModel):
    detail: str
    dependency: str = Field(description="the service that did not answer: postgresql or redis")
    retry_after_s: int


UNAVAILABLE_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    503: {
        "model": UnavailableOut,
        "description": "PostgreSQL or Redis is unreachable for now; retry after `Retry-After`",
        "headers": {
            "Retry-After": {
                "description": "seconds to wait before retrying",
                "schema": {"type": "integer"},
            }
        },
        "content": {
            "application/json": {
                "example": {
                    "detail": "postgresql is unreachable; retry later",
                    "dependency": "postgresql",
                    "retry_after_s": 2,
                }
            }
        },
    }
}


def unavailable(dependency: str) -> JSONResponse:
    return JSONResponse(
        {
            "detail": f"{dependency} is unreachable; retry later",
            "dependency": dependency,
            "retry_after_s": API_RETRY_AFTER_S,
        },
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(API_RETRY_AFTER_S)},
    )


def install(app: FastAPI) -> None:
    """Map transient faults to 503 (other database errors stay 500s: they are bugs)."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        dependency = dependency_of(exc)
        if dependency is None:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return JSONResponse(
                {"detail": "internal server error"},
                status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
            )
        log.warning(
            "%s %s: %s unreachable: %s",
            request.method,
            request.url.path,
            dependency,
            str(exc).splitlines()[0][:200],
        )
        return unavailable(dependency)

    for error_type in (DBAPIError, *REDIS_TRANSIENT_ERRORS):
        app.add_exception_handler(error_type, handler)


class FaultBudget:
    """ASGI middleware: the request's retry budget and the `api` process label."""

    def __init__(self, app: ASGIApp, budget_s: float = API_RETRY_BUDGET_S) -> None:
        self.app = app
        self.budget_s = budget_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with transient_budget(self.budget_s), process_scope("api"):
            await self.app(scope, receive, send)
