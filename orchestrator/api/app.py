"""The HTTP API: `create_app()` wires the routers, error mapping, health and metrics.

Service errors map to HTTP here, so routes stay thin; every error body is JSON with a
`detail` (and `field` for a 422, `needed`/`available` for a 402).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException

import billing
from orchestrator import db
from orchestrator.accounts import KeyCache
from orchestrator.api import (
    routes_account,
    routes_admin,
    routes_billing,
    routes_jobs,
    routes_styles,
    routes_tunes,
    unavailable,
)
from orchestrator.api.deps import EngineDep
from orchestrator.api.docs import ok, responses
from orchestrator.api.limits import BodyLimit
from orchestrator.api.metrics import RequestMetrics, make_registry
from orchestrator.api.pages import install_docs
from orchestrator.api.schemas import Health
from orchestrator.faults import API_RETRY_AFTER_S
from orchestrator.jobs import service as jobs
from orchestrator.jobs.images import InvalidImage, UnknownImage
from orchestrator.scheduling.dispatch import get_publisher
from orchestrator.scheduling.nudger import Nudger
from orchestrator.settings import get_settings
from orchestrator.ttl_cache import TtlCache
from orchestrator.tunes import service as tunes

log = logging.getLogger(__name__)

DESCRIPTION = """Credit-gated GPU jobs. Authenticate with `Authorization: Bearer <api key>`
(admin routes: the admin token). Quote a spec, submit it (credits are held), poll it, fetch
its outputs; a job is charged only for delivered outputs and refunded otherwise.

Errors are JSON `{"detail": ...}`; a 422 names the offending `field` (an unknown field in a
job spec too), a 402 says `needed` and `available`."""
QUEUE_POSITION_TTL_S = 1.0
# FastAPI's answer to a body it cannot decode (not UTF-8, for one): a 400 without a field.
UNPARSABLE_BODY = "There was an error parsing the body"


def _error(code: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=code)


def _insufficient(exc: billing.InsufficientCredits, job_id: str | None = None) -> JSONResponse:
    return _error(
        status.HTTP_402_PAYMENT_REQUIRED,
        str(exc),
        needed=exc.needed,
        available=exc.available,
        credit_kind=exc.kind,
        job_id=job_id,
    )


def _field_of(loc: tuple[Any, ...]) -> str:
    """The offending field from a pydantic error location (`body`, a model name or a list
    index are skipped: ("body", "JobRequest", "spec", "steps") -> "spec.steps")."""
    if not loc:
        return "body"
    parts = [p for p in loc[1:] if isinstance(p, str) and not p[:1].isupper()]
    return ".".join(parts) or str(loc[0])


def _install_error_handlers(app: FastAPI) -> None:
    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, billing.InvalidJobSpec | billing.InvalidAmount | InvalidImage)
        return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc), field=exc.field)

    async def unknown_image(request: Request, exc: Exception) -> JSONResponse:
        return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc), field="image_id")

    async def validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        field = _field_of(tuple(first.get("loc", ("body",))))
        return _error(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"{field}: {first.get('msg')}", field=field
        )

    async def rejected(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, jobs.JobRejected)
        if isinstance(exc.cause, billing.InsufficientCredits):
            return _insufficient(exc.cause, exc.job_id)
        return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc), job_id=exc.job_id)

    async def insufficient(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, billing.InsufficientCredits)
        return _insufficient(exc)

    def plain(code: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            return _error(code, str(exc))

        return handler

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == status.HTTP_400_BAD_REQUEST and exc.detail == UNPARSABLE_BODY:
            return _error(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                "body: not valid JSON (send UTF-8 encoded JSON)",
                field="body",
            )
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(status.HTTP_500_INTERNAL_SERVER_ERROR, "internal server error")

    for invalid_type in (billing.InvalidJobSpec, billing.InvalidAmount, InvalidImage):
        app.add_exception_handler(invalid_type, invalid)
    app.add_exception_handler(UnknownImage, unknown_image)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(jobs.JobRejected, rejected)
    app.add_exception_handler(billing.InsufficientCredits, insufficient)
    plain_errors: tuple[tuple[type[Exception], int], ...] = (
        (jobs.JobNotFound, status.HTTP_404_NOT_FOUND),
        (billing.UnknownAccount, status.HTTP_404_NOT_FOUND),
        (billing.UnknownGrant, status.HTTP_404_NOT_FOUND),
        (jobs.IdempotencyConflict, status.HTTP_409_CONFLICT),
        (jobs.CannotCancel, status.HTTP_409_CONFLICT),
        (billing.ReferenceConflict, status.HTTP_409_CONFLICT),
        (tunes.TuneGone, status.HTTP_410_GONE),
        (tunes.TuneNotReady, status.HTTP_409_CONFLICT),
    )
    for error_type, code in plain_errors:
        app.add_exception_handler(error_type, plain(code))
    app.add_exception_handler(Exception, internal)
    unavailable.install(app)


def warm_up() -> None:
    """Open the first database connection and the Redis publisher before a request needs
    them: the first POST after start paid for both (about 50 ms of its 200 ms, and the
    requests queued behind it waited too). Best effort, on a thread of its own: an
    unreachable database neither delays nor stops the start (requests then get 503s)."""
    with contextlib.suppress(Exception), db.get_engine().connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    with contextlib.suppress(Exception):
        get_publisher().redis.ping()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    threading.Thread(target=warm_up, name="tollgate-warm-up", daemon=True).start()
    yield
    app.state.nudger.stop()  # the last submits' dispatch and relay (else beat sends them)


def create_app() -> FastAPI:
    app = FastAPI(
        title="Tollgate",
        version="0.1.0",
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        lifespan=_lifespan,
    )
    settings = get_settings()
    app.state.key_cache = KeyCache(settings.api_key_cache_ttl_s, settings.api_key_cache_max)
    app.state.nudger = Nudger(
        db.get_engine, get_publisher, pass_interval_s=settings.sched_api_pass_interval_s
    )
    # A queued job's {position, eta_s}: the fair order's position is worth a second's age.
    app.state.queue_positions = TtlCache[dict[str, Any]](QUEUE_POSITION_TTL_S, 10_000)
    install_docs(app)
    _install_error_handlers(app)
    app.include_router(routes_jobs.router)
    app.include_router(routes_account.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_styles.router)
    app.include_router(routes_tunes.router)
    app.include_router(routes_billing.router)

    registry, requests, latency = make_registry(db.get_engine, lambda: get_settings().redis_url)
    app.state.payment_events = Counter(
        "tollgate_payment_events",
        "Payment provider webhook events by provider, type and outcome (processed, duplicate,"
        " ignored, unhandled: an unknown type, rejected: a 400, failed)",
        ["provider", "type", "outcome"],
        registry=registry,
    )
    app.add_middleware(RequestMetrics, requests=requests, latency=latency)
    app.add_middleware(BodyLimit)
    app.add_middleware(unavailable.FaultBudget)

    @app.get(
        "/healthz",
        response_model=Health,
        tags=["ops"],
        responses={
            200: ok(Health, "the database answers", {"status": "ok"}),
            503: ok(
                Health,
                "the database is unreachable",
                {"status": "unavailable", "detail": "database unreachable"},
            ),
            **responses(),
        },
    )
    def healthz(engine: EngineDep) -> Any:
        """200 when the database answers, else 503 (with Retry-After)."""
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            log.warning("healthz: database unreachable: %s", exc)
            return JSONResponse(
                {"status": "unavailable", "detail": "database unreachable"},
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": str(API_RETRY_AFTER_S)},
            )
        return {"status": "ok"}

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text format",
                "content": {
                    CONTENT_TYPE_LATEST: {"example": 'tollgate_up{component="database"} 1.0\n'}
                },
            },
            **responses(),
        },
    )
    def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
