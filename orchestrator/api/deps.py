"""Dependencies: the engine, storage and publisher of this process, and authentication.

Clients send `Authorization: Bearer <api key>`; keys are looked up by their hash, through
the app's `KeyCache` (orchestrator.accounts: TOLLGATE_API_KEY_CACHE_TTL_S). Admin routes take
`Bearer <TOLLGATE_ADMIN_TOKEN>` and are disabled (403) while it is empty. A submit's dispatch
and outbox relay run on the app's `Nudger` thread (orchestrator.scheduling.nudger).
The dependencies are `async def`: FastAPI would run each sync one in the thread pool (a
thread hop per dependency per request); none of them blocks but a key cache miss, which is
sent to the pool.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from orchestrator import db, storage
from orchestrator.accounts import KeyCache, authenticate, hash_api_key
from orchestrator.scheduling import dispatch
from orchestrator.scheduling.nudger import Nudger
from orchestrator.scheduling.outbox import Publisher
from orchestrator.settings import get_settings

bearer = HTTPBearer(auto_error=False, description="an API key, or the admin token")
AUTH_HEADERS = {"WWW-Authenticate": "Bearer"}


async def get_engine() -> Engine:
    return db.get_engine()


async def get_storage() -> storage.Storage:
    return storage.get_storage()


async def get_publisher() -> Publisher:
    return dispatch.get_publisher()


async def get_nudger(request: Request) -> Nudger:
    nudger: Nudger = request.app.state.nudger
    return nudger


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
EngineDep = Annotated[Engine, Depends(get_engine)]
StorageDep = Annotated[storage.Storage, Depends(get_storage)]
PublisherDep = Annotated[Publisher, Depends(get_publisher)]
NudgerDep = Annotated[Nudger, Depends(get_nudger)]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers=AUTH_HEADERS)


async def current_account(request: Request, credentials: Credentials) -> str:
    """The account id of the caller's API key (401 without one or with a bad one). A key in
    the cache is answered on the event loop; a lookup runs in the thread pool. (The engine
    is read only on a miss, not through a dependency: every authenticated request runs this.)"""
    if credentials is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <api key>'")
    cache: KeyCache | None = getattr(request.app.state, "key_cache", None)
    account_id = cache.get(hash_api_key(credentials.credentials)) if cache else None
    if account_id is None:
        engine = db.get_engine()
        account_id = await run_in_threadpool(authenticate, engine, credentials.credentials, cache)
    if account_id is None:
        raise _unauthorized("invalid or revoked API key")
    return account_id


async def require_admin(credentials: Credentials) -> None:
    token = get_settings().admin_token
    if not token:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "admin routes are disabled (TOLLGATE_ADMIN_TOKEN is empty)"
        )
    if credentials is None:
        raise _unauthorized("missing admin token: send 'Authorization: Bearer <admin token>'")
    if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        raise _unauthorized("invalid admin token")


AccountId = Annotated[str, Depends(current_account)]
Admin = Depends(require_admin)
