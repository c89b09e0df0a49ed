"""orchestrator.storage on S3: moto's server (a real HTTP S3 endpoint, a child process)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from orchestrator.storage import Storage
from tests.support.s3 import environ


@pytest.fixture(scope="module")
def s3(s3_env: dict[str, str]) -> Iterator[Storage]:
    with environ(s3_env):
        yield Storage(s3_env["TOLLGATE_STORAGE_URL"])


def test_put_get_exists_and_delete_with_everything_under_a_key(s3: Storage) -> None:
    assert s3.is_s3 and s3.local_path("outputs/j/a1_0.png") is None
    assert s3.put("outputs/j/a1_0.png", b"png") == "outputs/j/a1_0.png"
    assert s3.get("outputs/j/a1_0.png") == b"png" and s3.exists("outputs/j/a1_0.png")
    s3.put("tunes/t1/a.bin", b"a")
    s3.put("tunes/t1/deep/b.bin", b"b")
    s3.delete("tunes/t1")
    assert not s3.exists("tunes/t1/a.bin") and not s3.exists("tunes/t1/deep/b.bin")
    s3.delete("outputs/j/a1_0.png")
    s3.delete("outputs/j/a1_0.png")  # idempotent
    assert not s3.exists("outputs/j/a1_0.png")
    with pytest.raises(FileNotFoundError):
        s3.get("outputs/j/a1_0.png")


def test_download_to_a_local_file(s3: Storage, tmp_path: Path) -> None:
    s3.put("loras/t2.safetensors", b"weights")
    dest = s3.download_to("loras/t2.safetensors", tmp_path / "w" / "t2.safetensors")
    assert dest.read_bytes() == b"weights" and [p.name for p in dest.parent.iterdir()] == [
        "t2.safetensors"
    ]


def test_a_presigned_url_downloads_without_credentials_and_carries_its_expiry(
    s3: Storage,
) -> None:
    """moto checks a presigned URL's signed headers but not its expiry (moto/s3/responses.py),
    so here the expiry is asserted on the URL: SigV4 query auth, X-Amz-Expires = the TTL.
    tests/test_s3_presigned_expiry.py shows it refused once expired, on s3rver."""
    s3.put("outputs/j2/a1_0.png", b"bytes of a png")
    url = s3.presigned_get("outputs/j2/a1_0.png", ttl_s=120)
    assert url is not None
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Expires"] == ["120"]
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
    assert abs((datetime.utcnow() - signed_at).total_seconds()) < 60
    assert httpx.get(url).content == b"bytes of a png"  # plain GET, no AWS credentials
    assert s3.presigned_get("outputs/j2/a1_0.png", ttl_s=10**9) is not None  # capped at 7 days


@pytest.mark.parametrize("key", ["../escape.png", "/etc/passwd", ""])
def test_keys_are_checked(s3: Storage, key: str) -> None:
    with pytest.raises(ValueError, match="bad storage key"):
        s3.put(key, b"x")
