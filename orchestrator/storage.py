"""Where input images and outputs live: a local directory by default, or any fsspec URL
(e.g. s3://bucket/prefix for S3-compatible storage) from TOLLGATE_STORAGE_URL."""

from __future__ import annotations

from functools import lru_cache

import fsspec
from fsspec.core import url_to_fs

from orchestrator.settings import get_settings


class Storage:
    def __init__(self, root_url: str) -> None:
        fs, root = url_to_fs(root_url)
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = root.rstrip("/")
        if self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol:
            self.fs.makedirs(self.root, exist_ok=True)

    def _full(self, key: str) -> str:
        if ".." in key.split("/") or key.startswith("/"):
            raise ValueError(f"bad storage key {key!r}")
        return f"{self.root}/{key}"

    def put(self, key: str, data: bytes) -> str:
        path = self._full(key)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
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


@lru_cache(maxsize=4)
def storage_for(url: str) -> Storage:
    return Storage(url)


def get_storage() -> Storage:
    return storage_for(get_settings().storage_url)
