"""The tune style catalogue. The router's lifespan loads and validates the catalogue, so a
broken styles.json stops the API from starting."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Final

from fastapi import APIRouter, FastAPI, Query
from pydantic import BaseModel, Field

from orchestrator.api.deps import AccountId
from orchestrator.api.docs import ok, responses
from orchestrator.api.unavailable import UNAVAILABLE_RESPONSES
from orchestrator.jobs.styles import get_catalogue


@asynccontextmanager
async def validate_catalogue(app: FastAPI) -> AsyncIterator[None]:
    get_catalogue()  # raises InvalidCatalogue (naming the style) on a broken file
    yield


router = APIRouter(
    prefix="/v1", tags=["styles"], lifespan=validate_catalogue, responses=UNAVAILABLE_RESPONSES
)

ERRORS: Final = responses(401)


class StyleOut(BaseModel):
    id: str
    name: str
    template: str = Field(description="the prompt; a tune puts '<token> <subject>' in {subject}")
    negative_prompt: str
    steps: int
    guidance: float
    tags: list[str]


class StyleList(BaseModel):
    styles: list[StyleOut]
    default: list[str] = Field(description="the styles a tune renders when it names none")


STYLES_EXAMPLE: Final = {
    "styles": [
        {
            "id": "studio-portrait",
            "name": "Studio portrait",
            "template": "a studio portrait photo of {subject}, soft light",
            "negative_prompt": "blurry",
            "steps": 30,
            "guidance": 7.0,
            "tags": ["portrait"],
        }
    ],
    "default": ["studio-portrait"],
}


@router.get(
    "/styles",
    response_model=StyleList,
    responses={200: ok(StyleList, "the catalogue", STYLES_EXAMPLE), **ERRORS},
)
def list_styles(
    _account: AccountId,
    tag: Annotated[
        str | None, Query(max_length=100, description="only styles with this tag")
    ] = None,
) -> dict[str, Any]:
    """The style catalogue a tune picks its 8 render styles from (file order)."""
    catalogue = get_catalogue()
    styles = catalogue.styles if tag is None else catalogue.with_tag(tag)
    return {"styles": [s.as_dict() for s in styles], "default": catalogue.default_ids()}
