"""A presigned output URL stops working when it expires, on an S3 server that enforces it.

moto's server (the suite's S3 server, tests/test_s3_e2e.py) does not check a presigned URL's
expiry, so this proof runs on s3rver (tests/s3rver/, Node.js), which checks SigV4 query
signatures and refuses expired ones. The job's output goes through the product's delivery
code and its S3 backend (boto3, TOLLGATE_STORAGE_URL=s3://...); the URL is the one
GET /v1/jobs/{id} hands out, with TOLLGATE_OUTPUT_URL_TTL_S short enough to wait out."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from orchestrator.api.app import create_app
from orchestrator.storage import Storage
from tests.api.test_delivery import delivered_job
from tests.api_helpers import image_bytes, make_account
from tests.support.s3 import environ

# Long enough for the checks before expiry (X-Amz-Date is whole seconds, so a URL can be up
# to 1 s younger than its TTL), short enough to wait out.
URL_TTL_S = 3


@pytest.fixture(scope="module")
def s3rver_settings(s3rver_env: dict[str, str], settings_env: None) -> Iterator[dict[str, str]]:
    with environ({**s3rver_env, "TOLLGATE_OUTPUT_URL_TTL_S": str(URL_TTL_S)}):
        yield s3rver_env


@pytest.fixture(scope="module")
def client(s3rver_settings: dict[str, str], announced_slots: None) -> Iterator[TestClient]:
    with TestClient(create_app()) as test_client:
        yield test_client


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return urlunsplit(parts._replace(query=urlencode(query)))


def refusal(url: str) -> tuple[int, str]:
    """The HTTP status and S3 error code of a GET of `url` ('' when it is not an error)."""
    res = httpx.get(url)
    code = re.search(r"<Code>(\w+)</Code>", res.text) if res.status_code >= 400 else None
    return res.status_code, code.group(1) if code else ""


def test_a_presigned_output_url_downloads_until_it_expires_then_answers_403(
    client: TestClient, pg_engine: Engine, s3rver_settings: dict[str, str]
) -> None:
    storage = Storage(s3rver_settings["TOLLGATE_STORAGE_URL"])
    _, headers = make_account(client, [], credits=1)
    job = delivered_job(client, headers, pg_engine, storage)
    [out] = job["outputs"]
    url = out["url"]
    parts = urlsplit(url)
    bucket = s3rver_settings["TOLLGATE_TEST_S3_BUCKET"]
    assert url.startswith(s3rver_settings["AWS_ENDPOINT_URL"] + "/")  # straight to the bucket
    assert parts.path == f"/{bucket}/tollgate/outputs/{job['id']}/a1_0.png"  # path style
    query = parse_qs(parts.query)
    assert query["X-Amz-Expires"] == [str(URL_TTL_S)]
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    expires_at = signed_at + timedelta(seconds=URL_TTL_S)
    assert abs(datetime.fromisoformat(out["expires_at"]) - expires_at) <= timedelta(seconds=1)

    res = httpx.get(url)  # no credentials: the signature is the only key
    assert res.status_code == 200 and res.content == image_bytes()
    # The server checks the signature: one hex digit off, a longer expiry written into the
    # URL, or an access key it does not know are refused.
    signature = query["X-Amz-Signature"][0]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert refusal(with_query(url, **{"X-Amz-Signature": flipped})) == (
        403,
        "SignatureDoesNotMatch",
    )
    assert refusal(with_query(url, **{"X-Amz-Expires": "3600"})) == (403, "SignatureDoesNotMatch")
    stranger = query["X-Amz-Credential"][0].replace("S3RVER/", "NOBODY/", 1)
    assert refusal(with_query(url, **{"X-Amz-Credential": stranger})) == (
        403,
        "InvalidAccessKeyId",
    )

    time.sleep(max(0.0, expires_at.timestamp() - time.time()) + 0.25)
    res = httpx.get(url)
    assert res.status_code == 403 and "Request has expired" in res.text, res.text
    assert refusal(url) == (403, "AccessDenied")
    # The bearer-key route still serves the output, and the job view signs a fresh URL.
    assert client.get(out["api_url"], headers=headers).content == image_bytes()
    fresh = client.get(f"/v1/jobs/{job['id']}", headers=headers).json()["outputs"][0]["url"]
    assert fresh != url and httpx.get(fresh).content == image_bytes()
