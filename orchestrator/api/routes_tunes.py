"""Tunes: status with 64 outputs and the contact sheet, explicit render, later prompts."""

from __future__ import annotations

from typing import Any, Final

from fastapi import APIRouter, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict

from orchestrator.api import output_urls
from orchestrator.api.deps import AccountId, EngineDep, PublisherDep, StorageDep
from orchestrator.api.schemas import ErrorOut, InsufficientOut, JobOut
from orchestrator.api.unavailable import UNAVAILABLE_RESPONSES
from orchestrator.jobs import service as jobs
from orchestrator.scheduling.scheduler import nudge
from orchestrator.tunes import service as tunes

router = APIRouter(prefix="/v1", tags=["tunes"], responses=UNAVAILABLE_RESPONSES)

ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    401: {"model": ErrorOut, "description": "missing or bad API key"},
    404: {"model": ErrorOut, "description": "no such tune (or not yours)"},
    410: {"model": ErrorOut, "description": "the tune's weights were deleted (retention)"},
}


@router.get("/tunes/{tune_id}", responses=ERRORS)
def get_tune(
    request: Request, tune_id: str, account_id: AccountId, engine: EngineDep, storage: StorageDep
) -> dict[str, Any]:
    """Status, progress, the 64 output URLs (expiring, as in GET /v1/jobs/{id}), the contact
    sheet, expiry, credits per kind."""
    sign = output_urls.signer(storage, output_urls.base_url(request))
    return tunes.tune_view(engine, storage, account_id, tune_id, sign)


@router.get("/tunes/{tune_id}/contact_sheet", responses=ERRORS, response_class=Response)
def contact_sheet(
    tune_id: str, account_id: AccountId, engine: EngineDep, storage: StorageDep
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
        **ERRORS,
        402: {"model": InsufficientOut},
        409: {"model": ErrorOut, "description": "not awaiting credits"},
    },
)
def render(
    tune_id: str, account_id: AccountId, engine: EngineDep, publish: PublisherDep
) -> dict[str, Any]:
    """Hold 64 tune_image credits and render a trained tune that was waiting for them."""
    job = tunes.start_render(engine, account_id, tune_id)
    nudge(engine, publish, tune_id)
    return job


class PromptIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    style: str | None = None
    prompt: str | None = None


@router.post(
    "/tunes/{tune_id}/prompts",
    response_model=JobOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses={**ERRORS, 402: {"model": InsufficientOut}, 422: {"model": ErrorOut}},
)
def prompt(
    tune_id: str,
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
