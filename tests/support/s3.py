"""Real S3-compatible servers for tests, each a child process on a free loopback port with a
bucket made with boto3; no in-process mocking.

- `moto_s3`: moto's server mode (`moto_server`), the suite's S3 server. It does not enforce
  a presigned URL's expiry (moto/s3/responses.py checks signed headers only).
- `s3rver`: s3rver (Node.js, tests/s3rver/), for the expiry proof: it checks SigV4 query
  signatures (SignatureDoesNotMatch) and refuses an expired presigned URL ("AccessDenied:
  Request has expired"). `npm ci` installs it on first use when tests/s3rver/node_modules
  is missing (.ci/run does it up front)."""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

SERVER_READY_TIMEOUT_S = 30
SERVER_STOP_TIMEOUT_S = 10
NPM_CI_TIMEOUT_S = 300
S3RVER_DIR = Path(__file__).resolve().parents[1] / "s3rver"
# s3rver's one built-in account (lib/models/account.js); any other key is InvalidAccessKeyId.
S3RVER_ACCESS_KEY = "S3RVER"
REGION = "us-east-1"


@contextmanager
def moto_s3(log_dir: Path) -> Iterator[dict[str, str]]:
    """Start moto_server; yield the AWS_* environment that points a client at it, with a new
    bucket in TOLLGATE_TEST_S3_BUCKET."""
    from orchestrator.standalone import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = Path(sys.executable).with_name("moto_server")
    argv = [str(moto)] if moto.exists() else [sys.executable, "-m", "moto.server"]

    def ready(log: str) -> str | None:
        try:
            httpx.get(f"{endpoint}/moto-api/", timeout=1)
        except httpx.HTTPError:
            return None
        return endpoint

    with _server("moto_server", [*argv, "-H", "127.0.0.1", "-p", str(port)], log_dir, ready) as at:
        yield _with_bucket(at, "testing", "testing")


@contextmanager
def s3rver(log_dir: Path) -> Iterator[dict[str, str]]:
    """Start s3rver (tests/s3rver/serve.js) with objects in a new temporary directory; yield
    the AWS_* environment that reaches it, with a new bucket in TOLLGATE_TEST_S3_BUCKET."""
    install_s3rver()

    def ready(log: str) -> str | None:
        found = re.search(r"^listening (\d+)$", log, re.MULTILINE)
        return f"http://127.0.0.1:{found.group(1)}" if found else None

    with tempfile.TemporaryDirectory(prefix="s3rver-") as data:
        argv = ["node", str(S3RVER_DIR / "serve.js"), data]
        with _server("s3rver", argv, log_dir, ready) as endpoint:
            yield _with_bucket(endpoint, S3RVER_ACCESS_KEY, S3RVER_ACCESS_KEY)


def install_s3rver() -> None:
    """`npm ci` in tests/s3rver once (package-lock.json pins it), under a lock."""
    if (S3RVER_DIR / "node_modules" / "@20minutes" / "s3rver").is_dir():
        return
    lock_path = Path(tempfile.gettempdir()) / "tollgate-s3rver-npm.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (S3RVER_DIR / "node_modules" / "@20minutes" / "s3rver").is_dir():
            return
        done = subprocess.run(
            ["npm", "ci", "--prefix", str(S3RVER_DIR), "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(f"npm ci in {S3RVER_DIR} failed: {done.stderr[-3000:]}")


@contextmanager
def _server(
    name: str,
    argv: list[str],
    log_dir: Path,
    ready: Callable[[str], str | None],
) -> Iterator[str]:
    """Run `argv` with its output in a log file until `ready` returns the endpoint; stop it
    after (SIGTERM, then SIGKILL)."""
    log_path = log_dir / f"{name}-{secrets.token_hex(3)}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        while (endpoint := ready(log_path.read_text(errors="replace"))) is None:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready: {log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _with_bucket(endpoint: str, access_key: str, secret_key: str) -> dict[str, str]:
    import boto3

    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": REGION,
        "TOLLGATE_TEST_S3_BUCKET": f"tollgate-test-{secrets.token_hex(4)}",
    }
    boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
    ).create_bucket(Bucket=env["TOLLGATE_TEST_S3_BUCKET"])
    return env


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """This process's environment (and settings) with `values` set, restored after."""
    from orchestrator.settings import get_settings

    saved = dict(os.environ)
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
