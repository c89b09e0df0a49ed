"""A bound on every request body (JSON routes; /v1/images enforces its own, tighter one).
Checked against Content-Length first, then counted while reading, so a chunked body over
the bound is a 413 like a sized one: the body is read here, up to the bound, before the
route sees it."""

from __future__ import annotations

import json
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The same bound as a Redis-queue message
# (orchestrator.ingress.messages.JOB_TEXT_MAX_BYTES): enough for a tune's inline photos at
# a sensible size; larger sets go through POST /v1/images.
BODY_BYTES_MAX: Final = 32 * 1024 * 1024
EXEMPT_PATHS: Final = ("/v1/images",)


def _replay(message: Message, receive: Receive) -> Receive:
    """A receive that answers the whole body first, then waits on the client's (for a
    disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return message
        return await receive()

    return replay


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = BODY_BYTES_MAX) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > self.max_bytes:
                    await self._refuse(send)
                    return
                break
        first = await receive()
        if first["type"] != "http.request":  # the client went away
            return
        if not first.get("more_body", False):  # the usual case: the whole body at once
            if len(first.get("body", b"")) > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, _replay(first, receive), send)
            return
        chunks: list[bytes] = [first.get("body", b"")]
        seen = len(chunks[0])
        if seen > self.max_bytes:
            await self._refuse(send)
            return
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        whole: Message = {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, _replay(whole, receive), send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
