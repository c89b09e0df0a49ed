"""Request and response models of the HTTP API (they document /docs; the service layer
does the validating that matters, so job specs pass through unchanged)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

from orchestrator.api.examples import SPEC_EXAMPLES

# PostgreSQL text refuses NUL: every string the API takes excludes it, and has a length bound.
NO_NUL_PATTERN: Final = r"^[^\x00]*$"
NAME_MAX_CHARS: Final = 200
WORD_MAX_CHARS: Final = 32
REFERENCE_MAX_CHARS: Final = 200  # billing.tables.REFERENCE_MAX_LEN
CALLBACK_URL_MAX_CHARS: Final = 2000  # orchestrator.specs.CALLBACK_URL_MAX_CHARS
GRANT_AMOUNT_MAX: Final = 10_000_000  # billing.ledger.GRANT_AMOUNT_MAX


def _text(max_chars: int, min_chars: int = 0) -> StringConstraints:
    return StringConstraints(min_length=min_chars, max_length=max_chars, pattern=NO_NUL_PATTERN)


Name = Annotated[str, _text(NAME_MAX_CHARS, 1)]
Word = Annotated[str, _text(WORD_MAX_CHARS)]
Reference = Annotated[str, _text(REFERENCE_MAX_CHARS, 1)]
CallbackUrl = Annotated[str, _text(CALLBACK_URL_MAX_CHARS)]
Prompt = Annotated[str, _text(2000)]  # orchestrator.specs.PROMPT_MAX_CHARS


class JobSpec(BaseModel):
    """A job spec. Fields depend on `type`; a field the type does not take is refused with
    a 422 naming it (as is every bad value). Tune fields: name, subject, image_ids or
    images_b64 (4..20), base_model, styles, training {steps, rank, learning_rate}."""

    model_config = ConfigDict(
        extra="allow", json_schema_extra={"examples": list(SPEC_EXAMPLES.values())}
    )

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
    model: Any = Field(None, description="txt2img and image jobs: a model id (default per type)")
    alpha_matting: Any = Field(None, description="remove_background: true or false")

    def as_spec(self) -> dict[str, Any]:
        """The spec exactly as sent (no defaults filled in, no coercion)."""
        return self.model_dump(exclude_unset=True)


class JobRequest(BaseModel):
    """POST /v1/jobs body. A bare spec (an object with `type`) is accepted too."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"spec": spec, "callback_url": "https://example.com/hook"}
                for spec in SPEC_EXAMPLES.values()
            ]
        },
    )

    spec: dict[str, Any]
    callback_url: CallbackUrl | None = Field(
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
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "acme", "plan": "free"}]})

    name: Name
    plan: Word = Field("free", description="free, standard or business")


class AccountOut(BaseModel):
    id: str
    api_key: str = Field(description="shown once; only its hash is stored")


class GrantIn(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"kind": "image", "amount": 100, "reference": "order-1234"}]
        }
    )

    kind: Word = Field(description="image, tune or tune_image")
    amount: StrictInt = Field(ge=1, le=GRANT_AMOUNT_MAX)
    source: Word = Field("purchase", description="purchase, plan, promo or adjustment")
    reference: Reference = Field(
        description="idempotency reference: the same grant again adds nothing"
    )
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
    model_config = ConfigDict(extra="allow")  # a 503 adds `detail`

    status: str
