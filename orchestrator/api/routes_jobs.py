"""Quotes, jobs, outputs and input images. Service errors become HTTP errors in app.py."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import (
    APIRouter,
    Body,
    Depends,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    status,
)
from sqlalchemy import Connection, Engine, select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.types import Message

import billing
from billing.db import run_transaction
from orchestrator import db
from orchestrator.api import output_urls
from orchestrator.api.deps import AccountId, EngineDep, PublisherDep, StorageDep
from orchestrator.api.docs import error, job_id_param, ok, responses, spec_examples
from orchestrator.api.examples import JOB_EXAMPLE
from orchestrator.api.schemas import (
    WORD_MAX_CHARS,
    ImageOut,
    JobList,
    JobOut,
    JobRequest,
    JobSpec,
    QuoteOut,
)
from orchestrator.api.unavailable import UNAVAILABLE_RESPONSES
from orchestrator.jobs import service as jobs
from orchestrator.jobs import states
from orchestrator.jobs.images import IMAGE_BYTES_MAX, InvalidImage, store_image
from orchestrator.jobs.records import OutputSigner
from orchestrator.scheduling.nudger import Nudger
from orchestrator.scheduling.outbox import Publisher
from orchestrator.scheduling.queues import queue_info
from orchestrator.scheduling.scheduler import nudge
from orchestrator.storage import Storage, get_storage
from orchestrator.tables import IDEMPOTENCY_KEY_MAX_LEN, images
from orchestrator.ttl_cache import TtlCache

router = APIRouter(prefix="/v1", tags=["jobs"], responses=UNAVAILABLE_RESPONSES)

# Room for multipart boundaries and part headers around an image of IMAGE_BYTES_MAX.
MULTIPART_OVERHEAD_MAX: Final = 64 * 1024
IMAGE_CONTENT_TYPES: Final = ("image/png", "image/jpeg", "image/webp")
OUTPUTS_MAX: Final = 64  # a tune's render
JobIdPath = Annotated[str, Depends(job_id_param)]
QUOTE_EXAMPLE: Final = {
    "credits": 4,
    "credit_kind": "image",
    "breakdown": {"row": "512x512", "step_band": "<=50", "per_image": 1, "num_images": 4},
}
IMAGE_EXAMPLE: Final = {
    "image_id": "img_0123456789abcdef01234567",
    "width": 640,
    "height": 480,
    "format": "PNG",
    "bytes": 123456,
}
JOB_OK: Final = ok(JobOut, "the job", JOB_EXAMPLE)


@router.post(
    "/quote",
    response_model=QuoteOut,
    responses={200: ok(QuoteOut, "the price", QUOTE_EXAMPLE), **responses(401)},
)
def quote(
    spec: Annotated[JobSpec, Body(openapi_examples=spec_examples(wrapped=False))],
    _account: AccountId,
) -> dict[str, Any]:
    """Price a job spec. Places no hold."""
    return billing.quote(spec.as_spec()).as_dict()


@router.post(
    "/jobs",
    response_model=JobOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        202: ok(JobOut, "accepted and queued: the credits are held", JOB_EXAMPLE),
        200: ok(JobOut, "an Idempotency-Key replay: the same job", JOB_EXAMPLE),
        **responses(
            401,
            402,
            404,
            409,
            410,
            e404="a tune_prompt job's tune is unknown (or not yours)",
            e409="Idempotency-Key reused with another body, or the tune is not trained",
            e410="a tune_prompt job's tune was deleted by retention",
        ),
    },
)
async def submit_job(
    body: Annotated[JobRequest | JobSpec, Body(openapi_examples=spec_examples(wrapped=True))],
    account_id: AccountId,
    request: Request,
    response: Response,
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=IDEMPOTENCY_KEY_MAX_LEN)
    ] = None,
) -> dict[str, Any]:
    """Submit a job: `{"spec": {...}, "callback_url": ...}`, or a bare spec. It is priced,
    the credits are held, and it is queued. With `Idempotency-Key`, retrying the same body
    returns the same job (200); another body under that key is a 409. The answer comes at
    the job's commit; its dispatch and relay follow on the process's nudger thread."""
    # `async def`, the transaction sent to the thread pool here: for a sync endpoint FastAPI
    # would run the response's validation in the pool too (a second thread hop per request).
    # The engine, storage and nudger are read here, not through dependencies: each
    # dependency costs FastAPI ~70 Python calls per request on the API's hottest route.
    events: list[str] | None = None
    if isinstance(body, JobRequest):
        spec, callback_url, events = body.spec, body.callback_url, body.webhook_events_filter
    else:
        spec, callback_url = body.as_spec(), None
    nudger: Nudger = request.app.state.nudger
    submitted = await run_in_threadpool(
        jobs.submit,
        db.get_engine(),
        get_storage(),
        account_id,
        spec,
        idempotency_key=idempotency_key,
        callback_url=callback_url,
        webhook_events_filter=events,
        account_known=True,
    )
    nudger.poke(submitted.job["id"])
    if not submitted.created:
        response.status_code = status.HTTP_200_OK
    return submitted.job


@router.get(
    "/jobs",
    response_model=JobList,
    responses={200: ok(JobList, "your jobs", {"jobs": [JOB_EXAMPLE]}), **responses(401)},
)
def list_jobs(
    request: Request,
    account_id: AccountId,
    engine: EngineDep,
    storage: StorageDep,
    job_status: Annotated[
        str | None,
        Query(alias="status", max_length=WORD_MAX_CHARS, description=", ".join(states.STATUSES)),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=jobs.LIST_LIMIT_MAX)] = 20,
) -> dict[str, Any]:
    """Your jobs, newest first (outputs with expiring URLs, as in GET /v1/jobs/{id})."""
    sign = output_urls.signer(storage, output_urls.base_url(request))
    return {"jobs": jobs.list_jobs(engine, account_id, status=job_status, limit=limit, sign=sign)}


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    responses={200: JOB_OK, **responses(401, 404)},
)
async def get_job(
    request: Request,
    job_id: JobIdPath,
    account_id: AccountId,
    engine: EngineDep,
    storage: StorageDep,
    publish: PublisherDep,
) -> dict[str, Any]:
    """A job. Each stored output has a `url` that works without an API key until its
    `expires_at` (TOLLGATE_OUTPUT_URL_TTL_S): presigned on S3, HMAC-signed
    /v1/outputs/... on local storage. `webhook` shows the last callback delivery. While it
    waits for a worker slot, `queue: {position, eta_s}` (computed at most once a second per
    API process: QUEUE_POSITION_TTL_S)."""
    # One thread hop (as for submit_job): the reads in the pool, the answer's validation here.
    sign = output_urls.signer(storage, output_urls.base_url(request))
    positions: TtlCache[dict[str, Any]] = request.app.state.queue_positions
    return await run_in_threadpool(
        _job_with_place, engine, account_id, job_id, sign, positions, publish
    )


def _job_with_place(
    engine: Engine,
    account_id: str,
    job_id: str,
    sign: OutputSigner,
    positions: TtlCache[dict[str, Any]],
    publish: Publisher,
) -> dict[str, Any]:
    job = jobs.get(engine, account_id, job_id, sign)
    if job["status"] in (states.QUEUED, states.RENDERING):
        job["queue"] = positions.get(job_id)
        redis = getattr(publish, "redis", None)
        if job["queue"] is None and redis is not None:
            job["queue"] = queue_info(engine, redis, job_id)
            if job["queue"] is not None:
                positions.put(job_id, job["queue"])
    return job


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    responses={
        200: ok(JobOut, "canceled and refunded", {**JOB_EXAMPLE, "status": "canceled"}),
        202: ok(JobOut, "running: cancel requested", {**JOB_EXAMPLE, "status": "running"}),
        **responses(401, 404, 409, e409="the job already ended"),
    },
)
def cancel_job(
    job_id: JobIdPath,
    account_id: AccountId,
    engine: EngineDep,
    publish: PublisherDep,
    response: Response,
) -> dict[str, Any]:
    """Queued or dispatched: canceled and refunded now (200). Running: the worker stops at
    its next step and charges only delivered outputs (202). Ended: 409."""
    job = jobs.cancel(engine, account_id, job_id)
    nudge(engine, publish, job_id)
    if job["status"] in (states.RUNNING, states.TRAINING, states.RENDERING):
        response.status_code = status.HTTP_202_ACCEPTED
    return job


@router.get(
    "/jobs/{job_id}/outputs/{index}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "the PNG"},
        **responses(401, 404),
        410: error(410, "deleted by output retention"),
    },
)
def get_output(
    job_id: JobIdPath,
    index: Annotated[int, Path(ge=0, lt=OUTPUTS_MAX)],
    account_id: AccountId,
    engine: EngineDep,
    storage: StorageDep,
) -> Response:
    """The PNG bytes of delivered output `index`."""
    row = run_transaction(engine, lambda conn: jobs.get_row(conn, account_id, job_id))
    return output_response(row, index, storage)


def output_response(row: Any, index: int, storage: Storage) -> Response:
    """The PNG of a job row's delivered output `index`: 404 unknown, 410 deleted."""
    found = [o for o in row.outputs or [] if o.get("index") == index and o.get("delivered")]
    if not found or not found[0].get("key"):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {row.id} has no output {index}")
    if row.outputs_deleted_at is not None:
        raise HTTPException(
            status.HTTP_410_GONE,
            f"output {index} of job {row.id} was deleted after the retention period",
        )
    try:
        data = storage.get(found[0]["key"])
    except FileNotFoundError:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"output {index} of job {row.id} is no longer stored"
        ) from None
    return Response(data, media_type="image/png")


@router.get(
    "/outputs/{job_id}/{index}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "the PNG"},
        **responses(404),
        403: error(403, "expired, or a bad signature"),
        410: error(410, "deleted by output retention"),
    },
)
def get_signed_output(
    job_id: JobIdPath,
    index: Annotated[int, Path(ge=0, lt=OUTPUTS_MAX)],
    engine: EngineDep,
    storage: StorageDep,
    expires: Annotated[int, Query(ge=0, le=2**63 - 1)],
    sig: Annotated[str, Query(max_length=64)],
) -> Response:
    """An output by the signed URL in the job's `outputs[].url` (local storage): no API
    key; 403 once `expires` (Unix seconds) has passed or when `sig` is wrong."""
    problem = output_urls.check(job_id, index, expires, sig)
    if problem:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"output URL: {problem}")
    row = run_transaction(engine, lambda conn: jobs.get_row(conn, None, job_id))
    return output_response(row, index, storage)


class TooLarge(Exception):
    pass


def _bounded(request: Request, limit: int) -> Request:
    """The request, reading at most `limit` body bytes (TooLarge past that)."""
    seen = 0

    async def receive() -> Message:
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise TooLarge
        return message

    # Without "app" in its scope, Starlette raises MultiPartException for a broken body
    # (rather than an HTTP 400), which _read_upload answers as a 422 naming `file`.
    return Request({k: v for k, v in request.scope.items() if k != "app"}, receive)


async def _read_upload(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = content_type == "multipart/form-data"
    if not multipart and content_type not in IMAGE_CONTENT_TYPES:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "send multipart/form-data with a `file` field, or the raw image with "
            "Content-Type image/png, image/jpeg or image/webp",
        )
    limit = IMAGE_BYTES_MAX + (MULTIPART_OVERHEAD_MAX if multipart else 0)
    too_large = HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE, f"images are limited to {IMAGE_BYTES_MAX} bytes"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    bounded = _bounded(request, limit)
    try:
        return await _read_bounded(bounded, multipart, too_large)
    except MultiPartException as exc:  # a broken body: bad input, not a bad request line
        raise InvalidImage("file", f"bad multipart body: {exc.message}") from None


async def _read_bounded(bounded: Request, multipart: bool, too_large: HTTPException) -> bytes:
    try:
        if not multipart:
            data = await bounded.body()
        else:
            async with bounded.form(max_files=1, max_fields=10) as form:
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    raise InvalidImage("file", "missing: send the image as the `file` field")
                data = await upload.read(IMAGE_BYTES_MAX + 1)
    except TooLarge:
        raise too_large from None
    if len(data) > IMAGE_BYTES_MAX:
        raise too_large
    return data


@router.post(
    "/images",
    response_model=ImageOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        201: ok(ImageOut, "stored", IMAGE_EXAMPLE),
        **responses(
            401,
            415,
            e413=f"over {IMAGE_BYTES_MAX} bytes",
            e415="neither multipart nor an image type",
            e422="not a PNG, JPEG or WebP image, too large a side, or bad multipart",
        ),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
                **{
                    t: {"schema": {"type": "string", "format": "binary"}}
                    for t in IMAGE_CONTENT_TYPES
                },
            },
        }
    },
)
async def upload_image(
    request: Request, account_id: AccountId, engine: EngineDep, storage: StorageDep
) -> dict[str, Any]:
    """Upload an input image: multipart/form-data with a `file` field, or the raw bytes
    with Content-Type image/png, image/jpeg or image/webp. At most IMAGE_BYTES_MAX bytes and
    4096 px a side; PNG, JPEG or WebP; decompression bombs are refused (422)."""
    data = await _read_upload(request)

    def work(conn: Connection) -> dict[str, Any]:
        image_id = store_image(conn, storage, account_id, data, field="file")
        row = conn.execute(select(images).where(images.c.id == image_id)).one()
        return {
            "image_id": row.id,
            "width": row.width,
            "height": row.height,
            "format": row.format,
            "bytes": row.bytes,
        }

    return await run_in_threadpool(run_transaction, engine, work)
