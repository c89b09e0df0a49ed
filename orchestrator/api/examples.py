"""Examples for the OpenAPI document: a job, a request per job type, an error per status."""

from __future__ import annotations

from typing import Any, Final

JOB_EXAMPLE: Final[dict[str, Any]] = {
    "id": "job_5f0c2a9e1b7d4c3a8e6f0b12",
    "account_id": "acct_3c1d9e7f",
    "type": "txt2img",
    "status": "queued",
    "progress": {"step": 0, "total": 30},
    "price": {"credits": 1, "credit_kind": "image"},
    "charged": 0,
    "refunded": 0,
    "outputs": [],
    "undelivered": [],
    "error": None,
    "created_at": "2026-01-01T12:00:00+00:00",
    "updated_at": "2026-01-01T12:00:00+00:00",
    "started_at": None,
    "finished_at": None,
}
PHOTO_B64: Final = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)
# One request example per job type (POST /v1/quote and POST /v1/jobs).
SPEC_EXAMPLES: Final[dict[str, dict[str, Any]]] = {
    "txt2img": {
        "type": "txt2img",
        "prompt": "a lighthouse at dawn, oil painting",
        "width": 512,
        "height": 512,
        "steps": 30,
        "num_images": 1,
    },
    "upscale": {"type": "upscale", "scale": 4, "image_id": "img_0123456789abcdef01234567"},
    "face_enhance": {"type": "face_enhance", "image_id": "img_0123456789abcdef01234567"},
    "remove_background": {"type": "remove_background", "image_b64": PHOTO_B64},
    "tune": {
        "type": "tune",
        "name": "my dog",
        "subject": "dog",
        "image_ids": [f"img_{i:024d}" for i in range(4)],
        "training": {"steps": 400},
    },
    "tune_prompt": {
        "type": "tune_prompt",
        "tune_id": "job_5f0c2a9e1b7d4c3a8e6f0b12",
        "prompt": "a photo of <token> dog on the moon",
        "num_images": 2,
    },
}
ERROR_EXAMPLES: Final[dict[int, tuple[str, dict[str, Any]]]] = {
    400: ("bad request", {"detail": "bad request"}),
    401: (
        "missing or bad credentials",
        {"detail": "missing API key: send 'Authorization: Bearer <api key>'"},
    ),
    402: (
        "not enough credits",
        {
            "detail": "insufficient image credits: needed 4, available 1",
            "needed": 4,
            "available": 1,
            "credit_kind": "image",
            "job_id": "job_5f0c2a9e1b7d4c3a8e6f0b12",
        },
    ),
    403: (
        "admin routes disabled (no TOLLGATE_ADMIN_TOKEN)",
        {"detail": "admin routes are disabled (TOLLGATE_ADMIN_TOKEN is empty)"},
    ),
    404: ("not found (or not yours)", {"detail": "job_5f0c2a9e1b7d4c3a8e6f0b12"}),
    409: ("conflict with the record's state", {"detail": "the job already ended"}),
    410: ("gone: deleted by retention", {"detail": "the tune's weights were deleted"}),
    413: ("request body too large", {"detail": "request body over 33554432 bytes"}),
    415: ("unsupported media type", {"detail": "send multipart/form-data with a `file` field"}),
    422: (
        "bad input; `field` names it",
        {"detail": "num_image: unknown field for a txt2img job", "field": "num_image"},
    ),
    503: ("a dependency is unreachable", {"detail": "database unreachable"}),
}
