"""Helpers for the API tests: images (good, bad, a decompression bomb), a real server, and
requests against the TestClient app (accounts, submissions, balances, settings overrides)."""

from __future__ import annotations

import io
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from PIL import Image

from orchestrator.settings import get_settings

REPO_ROOT = Path(__file__).parents[1]
SERVER_READY_TIMEOUT_S = 30


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 30000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (~110 MB of pixel data once decoded) that is
    ~100 KB on the wire; built row block by row block, so memory stays low."""
    row = b"\x00" * (1 + (side + 7) // 8)
    rows_per_block = 1000
    block = row * rows_per_block
    comp = zlib.compressobj(6)
    parts = [comp.compress(block) for _ in range(side // rows_per_block)]
    parts.append(comp.compress(row * (side % rows_per_block)))
    parts.append(comp.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def api_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`tollgate api` (the click command) in a subprocess; yields its base URL."""
    port = free_port()
    code = "from orchestrator.cli.api import api; api()"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "--port", str(port)],
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(base, proc, log_path)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(base: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"API server exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"API server not healthy: {log_path.read_text()[-3000:]}")


# --- requests against the TestClient app (tests/api/) ------------------------------------

ADMIN = {"Authorization": "Bearer test-admin-token"}
TXT2IMG: dict[str, Any] = {
    "type": "txt2img",
    "prompt": "a red bicycle",
    "width": 512,
    "height": 512,
    "steps": 20,
    "num_images": 1,
}

Headers = dict[str, str]


@contextmanager
def env_overridden(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


def make_account(
    http: TestClient, made: list[str], credits: int = 0, plan: str = "free"
) -> tuple[str, Headers]:
    res = http.post("/v1/accounts", json={"name": "api-test", "plan": plan}, headers=ADMIN)
    assert res.status_code == 201, res.text
    body = res.json()
    made.append(body["id"])
    if credits:
        grant = {"kind": "image", "amount": credits, "reference": f"g-{secrets.token_hex(8)}"}
        res = http.post(f"/v1/accounts/{body['id']}/grants", json=grant, headers=ADMIN)
        assert res.status_code == 201, res.text
    return body["id"], {"Authorization": f"Bearer {body['api_key']}"}


def image_balance(http: TestClient, headers: Headers) -> dict[str, int]:
    res = http.get("/v1/balance", headers=headers)
    assert res.status_code == 200, res.text
    found: dict[str, int] = res.json()["image"]
    return found


def settle(http: TestClient) -> None:
    """Wait for the app's nudger to dispatch and relay what was submitted so far (the API
    answers at the job's commit; the dispatch follows on a background thread)."""
    app: Any = http.app
    assert app.state.nudger.flush(timeout_s=10), "the nudger did not finish its passes"


def submit(http: TestClient, headers: Headers, spec: dict[str, Any] | None = None) -> Any:
    """POST /v1/jobs, then wait for its dispatch pass (see `settle`)."""
    res = http.post("/v1/jobs", json={"spec": spec or TXT2IMG}, headers=headers)
    settle(http)
    return res
