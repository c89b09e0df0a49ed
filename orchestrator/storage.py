"""Where input images and outputs live: a local directory by default, or any fsspec URL
(e.g. s3://bucket/prefix for S3-compatible storage) from TOLLGATE_STORAGE_URL."""

from __future__ import annotations

import os
import secrets
from functools import lru_cache

import fsspec
from fsspec.core import url_to_fs

from orchestrator.settings import get_settings


class Storage:
    def __init__(self, root_url: str) -> None:
        fs, root = url_to_fs(root_url)
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = root.rstrip("/")
        self.local = "file" in self.fs.protocol
        if self.local:
            self.fs.makedirs(self.root, exist_ok=True)

    def _full(self, key: str) -> str:
        if ".." in key.split("/") or key.startswith("/"):
            raise ValueError(f"bad storage key {key!r}")
        return f"{self.root}/{key}"

    def put(self, key: str, data: bytes) -> str:
        """Write `data` under `key`, durably: once put returns, a charge that depends on the
        file can be committed. Object stores (S3) are durable when the PUT answers; a local
        disk needs the file and its directory entry flushed, and a rename makes the file
        appear whole or not at all."""
        path = self._full(key)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self.local:
            _write_durably(path, data)
            return key
        with self.fs.open(path, "wb") as f:
            f.write(data)
        return key

    def get(self, key: str) -> bytes:
        with self.fs.open(self._full(key), "rb") as f:
            data: bytes = f.read()
        return data

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._full(key)))

    def delete(self, key: str) -> None:
        if self.fs.exists(self._full(key)):
            self.fs.rm(self._full(key), recursive=True)

    def local_path(self, key: str) -> str | None:
        """A filesystem path for local storage (for `make demo` output), else None."""
        return self._full(key) if "file" in self.fs.protocol else None


def _write_durably(path: str, data: bytes) -> None:
    parent = os.path.dirname(path)
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@lru_cache(maxsize=4)
def storage_for(url: str) -> Storage:
    return Storage(url)


def get_storage() -> Storage:
    return storage_for(get_settings().storage_url)
