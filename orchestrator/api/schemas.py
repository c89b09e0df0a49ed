"""Request and response models of the HTTP API (they document /docs; the service layer
does the validating that matters, so job specs pass through unchanged)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

TXT2IMG_EXAMPLE: dict[str, Any] = {
    "type": "txt2img",
    "prompt": "a lighthouse at dawn, oil painting",
    "width": 512,
    "height": 512,
    "steps": 30,
    "num_images": 1,
}


class JobSpec(BaseModel):
    """A job spec. Fields depend on `type`; unknown fields are passed to the service, which
    rejects what it cannot price with a 422 naming the field."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [TXT2IMG_EXAMPLE]})

    type: Any = Field(description="txt2img, upscale, face_enhance, remove_background or tune")
    prompt: Any = Field(None, description="txt2img: the prompt (required)")
    negative_prompt: Any = Field(None, description="txt2img: what to avoid")
    width: Any = Field(None, description="txt2img: 256..1024, a multiple of 8 (default 512)")
    height: Any = Field(None, description="txt2img: 256..1024, a multiple of 8 (default 512)")
    steps: Any = Field(None, description="txt2img: 1..150 (default 30)")
    num_images: Any = Field(None, description="txt2img: 1..8 (default 1)")
    guidance: Any = Field(None, description="txt2img: 0..30 (default 7.5)")
    seed: Any = Field(None, description="txt2img: fixed seed (default random)")
    scale: Any = Field(None, description="upscale: 2 or 4 (default 4)")
    image_id: Any = Field(None, description="image jobs: an id from POST /v1/images")
    image_b64: Any = Field(None, description="image jobs: the image inline, base64")

    def as_spec(self) -> dict[str, Any]:
        """The spec exactly as sent (no defaults filled in, no coercion)."""
        return self.model_dump(exclude_unset=True)


class JobRequest(BaseModel):
    """POST /v1/jobs body. A bare spec (an object with `type`) is accepted too."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"spec": TXT2IMG_EXAMPLE, "callback_url": "https://example.com/hook"}]
        },
    )

    spec: dict[str, Any]
    callback_url: str | None = Field(
        None, description="POSTed the job JSON (HMAC-signed) when the job ends"
    )


class QuoteOut(BaseModel):
    credits: int
    credit_kind: str
    breakdown: dict[str, Any]


class Price(BaseModel):
    credits: int
    credit_kind: str


class Progress(BaseModel):
    step: int
    total: int


class OutputOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    url: str


class UndeliveredOut(BaseModel):
    index: int
    reason: str | None


class QueuePlace(BaseModel):
    # Jobs that will run before this one (estimated from the fair order).
    position: int
    # Seconds until it starts: the family's mean run time x (position + 1) / live slots;
    # null while no worker serves its queue or no run time is known yet.
    eta_s: float | None


class JobOut(BaseModel):
    id: str
    account_id: str
    type: str
    status: str
    progress: Progress
    price: Price
    charged: int
    refunded: int
    outputs: list[OutputOut]
    undelivered: list[UndeliveredOut]
    error: str | None
    # ISO 8601 strings, exactly as in events and callbacks.
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    # Only on GET /v1/jobs/{id} while the job waits for a worker slot.
    queue: QueuePlace | None = None


class JobList(BaseModel):
    jobs: list[JobOut]


class ImageOut(BaseModel):
    image_id: str
    width: int
    height: int
    format: str
    bytes: int


class BalanceOut(BaseModel):
    balance: int
    held: int
    available: int


class EntryOut(BaseModel):
    id: int
    kind: str
    type: str
    delta_balance: int
    delta_held: int
    created_at: datetime


class LedgerPage(BaseModel):
    entries: list[EntryOut]
    next_before: int | None = Field(
        description="pass as `before` for the next (older) page; null on the last page"
    )


class AccountIn(BaseModel):
    name: str
    plan: str = Field("free", description="free, standard or business")


class AccountOut(BaseModel):
    id: str
    api_key: str = Field(description="shown once; only its hash is stored")


class GrantIn(BaseModel):
    kind: str = Field(description="image, tune or tune_image")
    amount: StrictInt
    source: str = Field("purchase", description="purchase, plan, promo or adjustment")
    reference: str = Field(description="idempotency reference: the same grant again adds nothing")
    expires_at: datetime | None = Field(None, description="ISO 8601 with a time zone")


class GrantOut(BaseModel):
    id: int
    account_id: str
    kind: str
    amount: int
    reference: str
    created: bool


class ErrorOut(BaseModel):
    detail: str
    field: str | None = None


class InsufficientOut(BaseModel):
    detail: str
    needed: int
    available: int
    credit_kind: str
    job_id: str | None = Field(None, description="the recorded `rejected` job")


class Health(BaseModel):
    status: str
