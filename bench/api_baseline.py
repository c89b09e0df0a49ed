"""The baseline for bench/api.py: the smallest honest endpoints of the same shape as
`POST /v1/jobs` and `GET /v1/jobs/{id}` on the same stack (FastAPI, uvicorn, pydantic,
psycopg 3), with none of Tollgate's logic.

- `POST /v1/jobs`: a bearer-token check (hash, in-memory lookup), a pydantic body, one
  durable `INSERT ... RETURNING` in its own transaction, a 202 JSON answer.
- `GET /v1/jobs/{id}`: the same check and one single-row `SELECT`.

Run: BASELINE_DATABASE_URL=postgresql://... BASELINE_API_KEY=... uvicorn bench.api_baseline:app
"""

from __future__ import annotations

import hashlib
import os
import queue
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Final

import psycopg
from fastapi import Depends, FastAPI, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

POOL_SIZE: Final = 8
TABLE_DDL: Final = """
CREATE TABLE IF NOT EXISTS bench_baseline_jobs (
    id text PRIMARY KEY,
    account_id text NOT NULL,
    spec jsonb NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)"""


class Spec(BaseModel):
    type: str = Field(max_length=20)
    prompt: str = Field(default="", max_length=2000)
    width: int = Field(default=512, ge=256, le=1024)
    height: int = Field(default=512, ge=256, le=1024)
    steps: int = Field(default=30, ge=1, le=150)
    num_images: int = Field(default=1, ge=1, le=8)


class Pool:
    """A fixed set of psycopg connections handed out to request threads."""

    def __init__(self, url: str, size: int) -> None:
        self._free: queue.Queue[psycopg.Connection[Any]] = queue.Queue()
        for _ in range(size):
            self._free.put(psycopg.connect(url))

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._free.get(timeout=30)
        try:
            yield conn
        finally:
            self._free.put(conn)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


app = FastAPI(title="bench baseline")
_pool: Pool | None = None
_keys: dict[str, str] = {}
bearer = HTTPBearer(auto_error=False)


@app.on_event("startup")
def _startup() -> None:
    global _pool
    url = os.environ["BASELINE_DATABASE_URL"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(TABLE_DDL)
    _pool = Pool(url, POOL_SIZE)
    # One key, or several (comma-separated): one account each, as the bench spreads its load.
    for i, key in enumerate(os.environ["BASELINE_API_KEY"].split(",")):
        _keys[_digest(key)] = f"acct_baseline_{i}"


def account(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    found = _keys.get(_digest(credentials.credentials)) if credentials else None
    if found is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API key")
    return found


@app.post("/v1/jobs", status_code=status.HTTP_202_ACCEPTED)
def submit(spec: Spec, account_id: Annotated[str, Depends(account)]) -> dict[str, Any]:
    assert _pool is not None
    job_id = "job_" + secrets.token_hex(12)
    with _pool.connection() as conn, conn.transaction():
        row = conn.execute(
            "INSERT INTO bench_baseline_jobs (id, account_id, spec, status)"
            " VALUES (%s, %s, %s, 'queued') RETURNING id, status, created_at",
            (job_id, account_id, psycopg.types.json.Jsonb(spec.model_dump())),
        ).fetchone()
    assert row is not None
    return {"id": row[0], "status": row[1], "created_at": row[2].isoformat()}


@app.get("/v1/jobs/{job_id}")
def get_job(job_id: str, account_id: Annotated[str, Depends(account)]) -> dict[str, Any]:
    assert _pool is not None
    with _pool.connection() as conn, conn.transaction():
        row = conn.execute(
            "SELECT id, status, spec, created_at FROM bench_baseline_jobs"
            " WHERE id = %s AND account_id = %s",
            (job_id, account_id),
        ).fetchone()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such job")
    return {"id": row[0], "status": row[1], "spec": row[2], "created_at": row[3].isoformat()}
