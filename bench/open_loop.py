"""The open-loop load generator of bench/api.py: `POST /v1/jobs` at a fixed rate whatever
the answers' timing, each latency from the request's scheduled send time."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Final

BODY: Final = '{"type": "txt2img", "prompt": "bench", "steps": 20}'
OPEN_LOOP_CONNECTIONS: Final = 32  # the generator's pool (each carries one request at a time)


def request_bytes(host: str, port: int, api_key: str) -> bytes:
    """One `POST /v1/jobs` as sent on a keep-alive HTTP/1.1 connection (built once)."""
    body = BODY.encode()
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 answer with a Content-Length body; its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return int(lines[0].split()[1])


async def _open_loop(
    host: str, port: int, api_key: str, rate: float, seconds: float, connections: int
) -> tuple[list[float], list[int]]:
    request = request_bytes(host, port, api_key)
    free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        free.put_nowait(await asyncio.open_connection(host, port))
    latencies: list[float] = []
    failures: list[int] = []
    loop = asyncio.get_running_loop()

    async def one(scheduled: float) -> None:
        reader, writer = await free.get()  # a busy pool delays the send: it counts
        try:
            writer.write(request)
            code = await _answer(reader)
        finally:
            free.put_nowait((reader, writer))
        # From the request's scheduled send time: time waiting for a connection counts.
        (latencies.append(loop.time() - scheduled) if code == 202 else failures.append(code))

    tasks = []
    start = loop.time() + 0.05
    for i in range(int(rate * seconds)):
        scheduled = start + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    while not free.empty():
        free.get_nowait()[1].close()
    return latencies, failures


@dataclass(frozen=True)
class Latency:
    accepted: int
    p50_ms: float
    p99_ms: float
    client_cpu_ms: float  # the generator's own CPU per request


def open_loop(
    url: str, api_key: str, rate: float, seconds: float, connections: int = OPEN_LOOP_CONNECTIONS
) -> Latency:
    """POST at a fixed rate whatever the answers' timing (open loop): asyncio over a bounded
    pool of keep-alive connections, the request's bytes built once, each latency measured
    from the request's scheduled send time (so queueing, in the server or for a free
    connection, counts). Raises if any answer was not 202."""
    host, port = url.removeprefix("http://").split(":")
    cpu0 = time.process_time()
    latencies, failures = asyncio.run(
        _open_loop(host, int(port), api_key, rate, seconds, connections)
    )
    cpu = time.process_time() - cpu0
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {sorted(set(failures))}")
    q = statistics.quantiles(latencies, n=100)
    return Latency(len(latencies), q[49] * 1000, q[98] * 1000, 1000 * cpu / len(latencies))
