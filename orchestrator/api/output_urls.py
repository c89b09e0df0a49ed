"""Expiring output URLs, made at the API edge (records.view takes the signer).

On S3 an output's `url` is a presigned GET: the client downloads straight from the bucket.
On local storage it is this API's `/v1/outputs/{job_id}/{index}?expires=&sig=`, an
HMAC-SHA256 (TOLLGATE_OUTPUT_URL_SECRET) over job id, index and expiry: no API key needed,
403 once expired or with a bad signature, 410 once retention deleted the output. Both last
TOLLGATE_OUTPUT_URL_TTL_S (default 3600 s)."""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime

from fastapi import Request

from orchestrator.jobs.records import OutputSigner
from orchestrator.settings import get_settings
from orchestrator.storage import Storage


def signature(secret: str, job_id: str, index: int, expires: int) -> str:
    message = f"{job_id}/{index}/{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def check(job_id: str, index: int, expires: int, sig: str, now_s: float | None = None) -> str:
    """'' when the signed URL is good, else why not ('expired', 'bad signature')."""
    expected = signature(get_settings().output_url_secret, job_id, index, expires)
    if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
        return "bad signature"
    if (time.time() if now_s is None else now_s) >= expires:
        return "expired"
    return ""


def base_url(request: Request) -> str:
    return (get_settings().public_url or str(request.base_url)).rstrip("/")


def signer(storage: Storage, base: str, now_s: float | None = None) -> OutputSigner:
    ttl_s = get_settings().output_url_ttl_s
    expires = int(time.time() if now_s is None else now_s) + ttl_s
    at = datetime.fromtimestamp(expires, UTC)
    secret = get_settings().output_url_secret

    def sign(job_id: str, index: int, key: str) -> tuple[str, datetime]:
        # The store's URL expires ttl_s after it is signed: read the clock right before (a
        # store's first signature can take a while, making its client), never after.
        signed_s = time.time() if now_s is None else now_s
        presigned = storage.presigned_get(key, ttl_s)
        if presigned is not None:
            return presigned, datetime.fromtimestamp(int(signed_s) + ttl_s, UTC)
        sig = signature(secret, job_id, index, expires)
        return f"{base}/v1/outputs/{job_id}/{index}?expires={expires}&sig={sig}", at

    return sign
