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
        None,
        description="receives the job's events as Standard Webhooks (webhook-id, "
        "webhook-timestamp, webhook-signature headers; TOLLGATE_CALLBACK_SECRET)",
    )
    # Checked by the job service (422 naming `webhook_events_filter`), so a bad value is
    # not mistaken for a bare spec by the union of request shapes.
    webhook_events_filter: Any = Field(
        None,
        description="which events reach callback_url: any of start, progress (at most one "
        "every 2 s), completed; default [completed]",
        json_schema_extra={
            "type": "array",
            "items": {"type": "string", "enum": ["start", "progress", "completed"]},
            "maxItems": 3,
        },
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
    # Fetches the PNG without an API key until expires_at: a presigned S3 GET, or a signed
    # /v1/outputs/... URL on local storage. None once retention deleted the output.
    url: str | None
    expires_at: str | None = None
    # The authenticated route (Bearer API key); 410 once deleted.
    api_url: str
    deleted: bool = False


class WebhookOut(BaseModel):
    """The job's callback: its events, and how the last delivery went (absent: none yet)."""

    model_config = ConfigDict(extra="allow")

    events: list[str]
    id: str | None = None
    event: str | None = None
    last_status: int | None = None
    attempts: int | None = None
    last_error: str | None = None
    delivered_at: str | None = None
    failed_at: str | None = None


class UndeliveredOut(BaseModel):
    index: int
    reason: str | None


class AttemptOut(BaseModel):
    """One attempt at a job's phase (running; training or rendering for a tune)."""

    number: int
    phase: str
    worker: str | None
    started_at: str
    ended_at: str | None
    # succeeded, failed, canceled, lease_expired (its worker stopped renewing the lease),
    # worker_lost, superseded, late; null while it runs.
    outcome: str | None
    detail: str | None


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
    # Set when output retention deleted the outputs (the job and its charges stay).
    outputs_deleted_at: str | None = None
    webhook: WebhookOut | None = None
    error: str | None
    # ISO 8601 strings, exactly as in events and callbacks.
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    # GET /v1/jobs/{id} only (empty in lists): every attempt, oldest first.
    attempts: list[AttemptOut] = []
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
    reference: str | None = Field(
        None, description="the grant's reference (grants, voids, expiries) or the hold's"
    )
    source: str | None = Field(None, description="a grant's source: purchase, plan, promo...")
    job_id: str | None = Field(None, description="the job a hold, commit or release is for")


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


class VoidIn(BaseModel):
    amount: StrictInt | None = Field(
        None, description="credits to void; absent: all that no void has asked for yet"
    )


class VoidOut(BaseModel):
    reference: str
    account_id: str
    kind: str
    requested: int
    voided: int = Field(description="taken out of the grant's free remainder now")
    shortfall: int = Field(description="not there: spent, expired, or held (voided on release)")
    total_voided: int
    total_shortfall: int


class AlertsIn(BaseModel):
    thresholds: dict[str, StrictInt | None] = Field(
        default_factory=dict,
        description="per kind (image, tune, tune_image): alert when available falls below;"
        " null removes the kind's alert; kinds not named are kept",
    )
    webhook_url: str | None = Field(
        None, description="where balance.low is POSTed (absent: unchanged; null: removed)"
    )


class AlertsOut(BaseModel):
    webhook_url: str | None
    thresholds: dict[str, int]
    armed: dict[str, bool]


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
