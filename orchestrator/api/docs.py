"""OpenAPI documentation of the routes: every status a route answers, with its model and an
example, request examples for every job type, and the path id parameters.

`responses(...)` builds a route's `responses=`: each code gets the standard description,
model and example below unless the route overrides them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final

from fastapi import HTTPException, Path, status

from orchestrator.api.examples import ERROR_EXAMPLES, SPEC_EXAMPLES
from orchestrator.api.schemas import ErrorOut, InsufficientOut

ID_MAX_CHARS: Final = 64
# Ids are made of these (job_..., img_..., acct_...); anything else cannot name a record.
ID_RE: Final = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def error(code: int, description: str | None = None) -> dict[str, Any]:
    default_description, example = ERROR_EXAMPLES[code]
    return {
        "model": InsufficientOut if code == status.HTTP_402_PAYMENT_REQUIRED else ErrorOut,
        "description": description or default_description,
        "content": {"application/json": {"example": example}},
    }


def ok(model: Any, description: str, example: Any) -> dict[str, Any]:
    return {
        "model": model,
        "description": description,
        "content": {"application/json": {"example": example}},
    }


def responses(*codes: int, **described: str) -> dict[int | str, dict[str, Any]]:
    """Error responses for `codes` (422 and 413 always: every route takes input). A code's
    description can be overridden: responses(404, 409, e409="the job already ended")."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in sorted({*codes, 413, 422}):
        out[code] = error(code, described.get(f"e{code}"))
    return out


def spec_examples(wrapped: bool) -> dict[str, dict[str, Any]]:
    """OpenAPI `examples` of a request body: one per job type."""
    return {
        name: {
            "summary": f"a {name} job",
            "value": {"spec": spec, "callback_url": "https://example.com/hook"}
            if wrapped
            else spec,
        }
        for name, spec in SPEC_EXAMPLES.items()
    }


def _checked(value: str, what: str) -> str:
    if not ID_RE.fullmatch(value):  # NUL bytes, slashes, ...: no record has such an id
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {what} {value[:ID_MAX_CHARS]!r}")
    return value


def job_id_param(
    job_id: Annotated[str, Path(max_length=ID_MAX_CHARS, description="a job id (job_...)")],
) -> str:
    return _checked(job_id, "job")


def tune_id_param(
    tune_id: Annotated[str, Path(max_length=ID_MAX_CHARS, description="a tune's job id")],
) -> str:
    return _checked(tune_id, "tune")


def account_id_param(
    account_id: Annotated[str, Path(max_length=ID_MAX_CHARS, description="an account id")],
) -> str:
    return _checked(account_id, "account")
