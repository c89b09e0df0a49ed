"""A real S3-compatible server for tests: moto's server mode (`moto_server`) as a child
process on a free loopback port, and a bucket made with boto3. No in-process mocking."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

MOTO_READY_TIMEOUT_S = 30


@contextmanager
def moto_s3(log_dir: Path) -> Iterator[dict[str, str]]:
    """Start moto_server; yield the AWS_* environment that points a client at it, with a new
    bucket in TOLLGATE_TEST_S3_BUCKET."""
    from orchestrator.standalone import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"moto-{secrets.token_hex(3)}.log"
    moto = Path(sys.executable).with_name("moto_server")
    argv = [str(moto)] if moto.exists() else [sys.executable, "-m", "moto.server"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*argv, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_ready(endpoint, proc, log_path)
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "TOLLGATE_TEST_S3_BUCKET": f"tollgate-test-{secrets.token_hex(4)}",
        }
        import boto3

        boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket=env["TOLLGATE_TEST_S3_BUCKET"])
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(endpoint: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + MOTO_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited: {log_path.read_text()[-3000:]}")
        try:
            httpx.get(f"{endpoint}/moto-api/", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server not ready: {log_path.read_text()[-3000:]}")


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
