"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 in a thread, recording each
POST (body bytes, headers, arrival time); it answers `status` (default 204), or 500 for the
first `fail_first` requests."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Delivery:
    body: bytes
    headers: dict[str, str]
    at: float


@dataclass
class Receiver:
    url: str = ""
    status: int = 204
    fail_first: int = 0
    received: list[Delivery] = field(default_factory=list)

    def wait(self, count: int, timeout_s: float = 30) -> list[Delivery]:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= count, f"{len(self.received)} of {count} deliveries came"
        return list(self.received)


@contextmanager
def receiver(status: int = 204, fail_first: int = 0) -> Iterator[Receiver]:
    state = Receiver(status=status, fail_first=fail_first)
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                state.received.append(Delivery(body, dict(self.headers), time.monotonic()))
                failing = state.fail_first > 0
                state.fail_first -= 1 if failing else 0
            self.send_response(500 if failing else state.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
