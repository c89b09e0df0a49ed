"""A TCP forwarder on 127.0.0.1 in front of a real server (PostgreSQL, Redis), for real
outages without mocks: `cut()` closes every connection and refuses new ones (the listening
port is closed), `restore()` listens again on the same port; `lose_next_answer(marker)`
forwards the next client chunk containing `marker` (b"COMMIT"), waits for the server's
answer, drops it and closes that connection: an ambiguous commit."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from typing import Final

CHUNK_BYTES: Final = 65536
ANSWER_WAIT_S: Final = 5.0


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()
        self._lose_marker: bytes | None = None
        self.answers_lost = 0
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port: int = probe.getsockname()[1]
        probe.close()
        self._listen()

    # -- control --

    def cut(self) -> None:
        """Close every connection and refuse new ones until restore()."""
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
        if listener is not None:
            _close(listener)  # shutdown wakes the thread blocked in accept()
        for a, b in pairs:
            _close(a)
            _close(b)

    def restore(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
        self._listen()

    def lose_next_answer(self, marker: bytes = b"COMMIT") -> None:
        self._lose_marker = marker

    def close(self) -> None:
        self._stopped.set()
        self.cut()

    # -- forwarding --

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5
        while True:
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    _close(client)
                    _close(server)
                    return
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, server)
        sel.register(server, selectors.EVENT_READ, client)
        try:
            while True:
                for key, _ in sel.select(timeout=1.0):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(CHUNK_BYTES)
                    if not data:
                        return
                    marker = self._lose_marker
                    if src is client and marker is not None and marker in data:
                        self._lose_marker = None
                        server.sendall(data)
                        server.settimeout(ANSWER_WAIT_S)
                        with contextlib.suppress(OSError):
                            server.recv(CHUNK_BYTES)  # the answer: applied, and dropped
                        self.answers_lost += 1
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            _close(client)
            _close(server)
            with self._lock:
                if (client, server) in self._pairs:
                    self._pairs.remove((client, server))


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
