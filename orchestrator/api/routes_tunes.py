"""Tunes: status with 64 outputs and the contact sheet, explicit render, later prompts."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.api import output_urls
from orchestrator.api.deps import AccountId, EngineDep, PublisherDep, StorageDep
from orchestrator.api.docs import ok, responses, tune_id_param
from orchestrator.api.examples import JOB_EXAMPLE
from orchestrator.api.schemas import JobOut, Prompt
from orchestrator.api.unavailable import UNAVAILABLE_RESPONSES
from orchestrator.jobs import service as jobs
from orchestrator.scheduling.scheduler import nudge
from orchestrator.tunes import service as tunes

router = APIRouter(prefix="/v1", tags=["tunes"], responses=UNAVAILABLE_RESPONSES)

TuneIdPath = Annotated[str, Depends(tune_id_param)]
TUNE_EXAMPLE: Final = {
    **JOB_EXAMPLE,
    "type": "tune",
    "status": "succeeded",
    "name": "my dog",
    "subject": "dog",
    "token": "sks",
    "base_model": "sd15",
    "styles": ["studio-portrait"],
    "contact_sheet": "/v1/tunes/job_5f0c2a9e1b7d4c3a8e6f0b12/contact_sheet",
    "trained_at": "2026-01-01T12:20:00+00:00",
    "expires_at": "2026-01-31T12:20:00+00:00",
    "weights_deleted": False,
    "credits": {
        "tune": {"held": 0, "charged": 1, "refunded": 0},
        "tune_image": {"held": 0, "charged": 64, "refunded": 0},
    },
}
ERRORS: Final = responses(
    401,
    404,
    410,
    e404="no such tune (or not yours)",
    e410="the tune's weights were deleted (retention)",
)
QUEUED: Final = ok(JobOut, "accepted and queued: the credits are held", JOB_EXAMPLE)


@router.get(
    "/tunes/{tune_id}",
    responses={
        200: {
            "description": "the tune",
            "content": {"application/json": {"example": TUNE_EXAMPLE}},
        },
        **ERRORS,
    },
)
def get_tune(
    request: Request,
    tune_id: TuneIdPath,
    account_id: AccountId,
    engine: EngineDep,
    storage: StorageDep,
) -> dict[str, Any]:
    """Status, progress, the 64 output URLs (expiring, as in GET /v1/jobs/{id}), the contact
    sheet, expiry, credits per kind."""
    sign = output_urls.signer(storage, output_urls.base_url(request))
    return tunes.tune_view(engine, storage, account_id, tune_id, sign)


@router.get(
    "/tunes/{tune_id}/contact_sheet",
    responses={200: {"content": {"image/png": {}}, "description": "the PNG"}, **ERRORS},
    response_class=Response,
)
def contact_sheet(
    tune_id: TuneIdPath, account_id: AccountId, engine: EngineDep, storage: StorageDep
) -> Response:
    view = tunes.tune_view(engine, storage, account_id, tune_id)
    if view["outputs_deleted_at"] is not None:
        raise HTTPException(
            status.HTTP_410_GONE, "the contact sheet was deleted after the retention period"
        )
    if view["contact_sheet"] is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no contact sheet yet")
    return Response(storage.get(f"tunes/{tune_id}/contact_sheet.png"), media_type="image/png")


@router.post(
    "/tunes/{tune_id}/render",
    response_model=JobOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        202: QUEUED,
        **ERRORS,
        **responses(402, 409, e409="the tune is not awaiting credits"),
    },
)
def render(
    tune_id: TuneIdPath, account_id: AccountId, engine: EngineDep, publish: PublisherDep
) -> dict[str, Any]:
    """Hold 64 tune_image credits and render a trained tune that was waiting for them."""
    job = tunes.start_render(engine, account_id, tune_id)
    nudge(engine, publish, tune_id)
    return job


class PromptIn(BaseModel):
    """A style id or a prompt; also width, height, steps, num_images, negative_prompt,
    guidance, seed (a field a tune_prompt job does not take is a 422 naming it)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [{"prompt": "a photo of <token> dog on the moon", "num_images": 2}]
        },
    )

    style: Annotated[str, Field(max_length=100, pattern=r"^[^\x00]*$")] | None = None
    prompt: Prompt | None = None


@router.post(
    "/tunes/{tune_id}/prompts",
    response_model=JobOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        202: QUEUED,
        **ERRORS,
        **responses(402, 409, e409="the tune is not trained yet, or failed"),
    },
)
def prompt(
    tune_id: TuneIdPath,
    body: PromptIn,
    account_id: AccountId,
    engine: EngineDep,
    storage: StorageDep,
    publish: PublisherDep,
) -> dict[str, Any]:
    """Render from a trained tune: a style id or a prompt containing the tune's token;
    num_images 1..8, width/height/steps priced by the table in tune_image credits."""
    spec = {**body.model_dump(exclude_unset=True), "type": "tune_prompt", "tune_id": tune_id}
    job = jobs.submit(engine, storage, account_id, spec).job
    nudge(engine, publish, job["id"])
    return job
