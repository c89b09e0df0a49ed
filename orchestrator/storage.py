"""Where input images, outputs, LoRA weights and contact sheets live, from
TOLLGATE_STORAGE_URL: a local directory (the default), `s3://bucket/prefix` for S3-compatible
object storage (boto3; endpoint and credentials from the usual AWS_* environment variables:
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION), or any other fsspec URL.

Callers see keys ("outputs/<job>/a1_0.png"), never paths: a worker that needs a file on its
disk (LoRA weights for diffusers/peft) copies it with `download_to`."""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import fsspec
from fsspec.core import url_to_fs

from orchestrator.errors import OrchestratorError
from orchestrator.settings import get_settings

# Bounds on every S3 call: botocore retries (standard mode) and socket timeouts.
S3_RETRIES_MAX: Final = 5
S3_CONNECT_TIMEOUT_S: Final = 5
S3_READ_TIMEOUT_S: Final = 60
# Keys deleted under one prefix by `delete` (S3 lists at most 1000 a page).
S3_DELETE_PAGES_MAX: Final = 100
PRESIGNED_TTL_MAX_S: Final = 7 * 24 * 3600  # the S3 signature v4 limit


class StorageError(OrchestratorError):
    pass


def _check_key(key: str) -> str:
    if not key or ".." in key.split("/") or key.startswith("/"):
        raise ValueError(f"bad storage key {key!r}")
    return key


class Storage:
    """One storage root. `Storage(url)` picks the backend from the URL's scheme."""

    def __init__(self, root_url: str) -> None:
        self.url = root_url
        self._backend: _S3 | _Fsspec = (
            _S3(root_url) if root_url.startswith("s3://") else _Fsspec(root_url)
        )
        self.is_s3 = isinstance(self._backend, _S3)

    def put(self, key: str, data: bytes, *, flush: bool = True) -> str:
        """Write `data` under `key`, durably: once put returns, a charge that depends on the
        object can be committed. S3 is durable when the PUT answers; a local disk needs the
        file and its directory entry flushed, and a rename makes it appear whole or not at all.
        `flush=False`: a local disk's flushes are left to `flush([key, ...])`, which must
        return before anything that depends on the object commits (a worker's outputs are
        flushed together right before its job's result is applied)."""
        self._backend.put(_check_key(key), data, flush)
        return key

    def flush(self, keys: list[str]) -> None:
        """Make objects written with `put(..., flush=False)` durable (a local disk: each file
        and, once each, their directories); a no-op for object stores."""
        if keys:
            self._backend.flush([_check_key(k) for k in keys])

    def get(self, key: str) -> bytes:
        """The bytes under `key`; FileNotFoundError when there are none."""
        return self._backend.get(_check_key(key))

    def exists(self, key: str) -> bool:
        return self._backend.exists(_check_key(key))

    def delete(self, key: str) -> None:
        """Delete `key` and anything under `key/` (idempotent)."""
        self._backend.delete(_check_key(key))

    def download_to(self, key: str, dest: Path) -> Path:
        """Copy `key` to the local file `dest`, atomically (a rename)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.{secrets.token_hex(4)}.tmp")
        try:
            tmp.write_bytes(self.get(key))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def presigned_get(self, key: str, ttl_s: int) -> str | None:
        """A URL that downloads `key` straight from the object store for `ttl_s` seconds,
        with no other credential; None where the backend has no such URLs (local disk)."""
        if not isinstance(self._backend, _S3):
            return None
        return self._backend.presigned_get(_check_key(key), min(ttl_s, PRESIGNED_TTL_MAX_S))

    def local_path(self, key: str) -> str | None:
        """A filesystem path for local storage (for `make demo` output), else None."""
        if isinstance(self._backend, _Fsspec) and self._backend.local:
            return self._backend.full(_check_key(key))
        return None


class _Fsspec:
    def __init__(self, root_url: str) -> None:
        fs, root = url_to_fs(root_url)
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = root.rstrip("/")
        self.local = "file" in self.fs.protocol
        if self.local:
            self.fs.makedirs(self.root, exist_ok=True)

    def full(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put(self, key: str, data: bytes, flush: bool = True) -> None:
        path = self.full(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            _write_durably(path, data, flush)
            return
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def flush(self, keys: list[str]) -> None:
        if not self.local:
            return  # the backend's own writes decide (fsspec closes each file on put)
        paths = [self.full(k) for k in keys]
        for path in paths:
            _fsync_path(path)
        for parent in dict.fromkeys(os.path.dirname(p) for p in paths):
            _fsync_path(parent)

    def get(self, key: str) -> bytes:
        with self.fs.open(self.full(key), "rb") as f:
            data: bytes = f.read()
        return data

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.full(key)))

    def delete(self, key: str) -> None:
        if self.fs.exists(self.full(key)):
            self.fs.rm(self.full(key), recursive=True)


class _S3:
    """S3 through boto3. The client is made per process (a forked Celery child gets its own
    connection pool) and on first use (importing this module needs no credentials)."""

    def __init__(self, root_url: str) -> None:
        rest = root_url.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StorageError(f"TOLLGATE_STORAGE_URL {root_url!r} names no bucket")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client: Any = None
        self._pid = 0

    @property
    def client(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            import boto3
            from botocore.config import Config

            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint or None,
                region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                config=Config(
                    retries={"max_attempts": S3_RETRIES_MAX, "mode": "standard"},
                    connect_timeout=S3_CONNECT_TIMEOUT_S,
                    read_timeout=S3_READ_TIMEOUT_S,
                    signature_version="s3v4",
                ),
            )
            self._pid = os.getpid()
        return self._client

    def full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, flush: bool = True) -> None:
        # Durable when the PUT answers, whatever `flush` says.
        self.client.put_object(Bucket=self.bucket, Key=self.full(key), Body=data)

    def flush(self, keys: list[str]) -> None:
        pass  # every PUT was durable when it answered

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.full(key))
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None
        data: bytes = response["Body"].read()
        return data

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.full(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.full(key))
        prefix = self.full(key) + "/"
        for _ in range(S3_DELETE_PAGES_MAX):
            page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1000)
            found = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if not found:
                return
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": found, "Quiet": True})
        raise StorageError(f"more than {S3_DELETE_PAGES_MAX * 1000} objects under {prefix!r}")

    def presigned_get(self, key: str, ttl_s: int) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.full(key)}, ExpiresIn=ttl_s
        )
        return url


def _write_durably(path: str, data: bytes, flush: bool = True) -> None:
    """A temporary file renamed into place (readers see the whole file or none); with
    `flush`, the file and its directory entry are on disk when this returns (else
    `_fsync_path` of both must run before anything depends on them)."""
    parent = os.path.dirname(path)
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if flush:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if flush:
        _fsync_path(parent)


def _fsync_path(path: str) -> None:
    """fsync a file or a directory by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@lru_cache(maxsize=4)
def storage_for(url: str) -> Storage:
    return Storage(url)


def get_storage() -> Storage:
    return storage_for(get_settings().storage_url)
