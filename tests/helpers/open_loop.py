"""A cheap open-loop HTTP/1.1 load generator for the overload test.

The overload test runs the generator, the gateway and Triton on the same two cores, so every CPU cycle the
generator spends is taken from the system it measures. aiohttp costs tens of microseconds per request in its
client machinery (request building, header multidicts, response objects); at three times the capacity that share
showed up as lost goodput. This generator keeps only what an open loop needs:

- request bytes are built once per distinct payload, before the clock starts;
- connections are kept alive and reused (a free one is taken, a new one opened only when all are busy), so the
  gateway sees the same keep-alive traffic as from a real client pool;
- the response is parsed just enough: status line, ``Content-Length``, and the headers the test asks for.

Sends are paced by the clock and bounded by count; each request is a task that never waits for the others.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Outcome:
    """Everything the open loop observed."""

    sent: int = 0
    codes: Counter[int] = field(default_factory=Counter)
    lost: int = 0
    """Requests without an HTTP answer (connection error or client timeout)."""
    headers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    """(status, wanted headers) of every answered request, in completion order."""
    offered_seconds: float = 0.0
    """How long sending took (the offered window)."""
    connections_opened: int = 0
    stale_retries: int = 0
    """Requests sent again because a kept-alive connection had been closed by the server while idle."""
    errors: Counter[str] = field(default_factory=Counter)
    """Exception names of the lost requests."""


def build_request(host: str, path: str, body: bytes, content_type: str = "application/json") -> bytes:
    """The bytes of one keep-alive POST."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode("ascii") + body


async def read_response(
    reader: asyncio.StreamReader, wanted: Sequence[bytes] = ()
) -> tuple[int, dict[str, str], bytes, bool]:
    """Read one HTTP/1.1 response with a ``Content-Length`` body.

    Args:
        reader: The connection's stream.
        wanted: Lower-case header names to return.

    Returns:
        ``(status, {name: value} of the wanted headers, body, keep_alive)``.

    Raises:
        ValueError: The response is chunked or has no length (the gateway always sends one).
        asyncio.IncompleteReadError: The peer closed the connection mid-response.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    keep_alive = True
    found: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.lower() == b"close":
            keep_alive = False
        elif name == b"transfer-encoding":
            raise ValueError(f"unsupported transfer-encoding {value!r}")
        if name in wanted:
            found[name.decode()] = value.decode()
    if length is None:
        raise ValueError("response without Content-Length")
    body = await reader.readexactly(length) if length else b""
    return status, found, body, keep_alive


async def open_loop(
    host: str,
    port: int,
    path: str,
    bodies: Sequence[bytes],
    rate_per_second: float,
    seconds: float,
    *,
    wanted_headers: Sequence[str] = (),
    timeout_seconds: float = 30.0,
    on_answer: Callable[[int, dict[str, str], bytes], None] | None = None,
) -> Outcome:
    """Offer ``rate_per_second`` requests for ``seconds``, whatever the answers; bodies are used in turn.

    Args:
        host: Server address (127.0.0.1).
        port: Server port.
        path: Request path.
        bodies: Request bodies, cycled.
        rate_per_second: Offered rate; sends are paced by the clock (a late loop sends the backlog at once).
        seconds: Length of the offered window; ``int(rate * seconds)`` requests are sent in total.
        wanted_headers: Response headers to collect (case-insensitive).
        timeout_seconds: Per-request limit; a request past it counts as lost.
        on_answer: Called with ``(status, headers, body)`` of every answer.
    """
    requests = [build_request(f"{host}:{port}", path, b) for b in bodies]
    wanted = tuple(h.lower().encode() for h in wanted_headers)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    out = Outcome()
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        conn = idle.pop() if idle else None
        try:
            async with asyncio.timeout(timeout_seconds):
                for attempt in (0, 1):
                    reused = conn is not None
                    if conn is None:
                        conn = await asyncio.open_connection(host, port)
                        out.connections_opened += 1
                    reader, writer = conn
                    try:
                        writer.write(requests[i % len(requests)])
                        status, headers, body, keep_alive = await read_response(reader, wanted)
                        break
                    except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
                        # A kept-alive connection the server closed while it sat idle (its keep-alive timeout):
                        # nothing was answered, so the request goes once more on a fresh connection, as HTTP
                        # client pools do. A fresh connection that fails without an answer is a loss.
                        writer.close()
                        conn = None
                        partial = isinstance(exc, asyncio.IncompleteReadError) and bool(exc.partial)
                        if not reused or partial or attempt:
                            raise
                        out.stale_retries += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as exc:
            out.lost += 1
            out.errors[type(exc).__name__] += 1
            if conn is not None:
                conn[1].close()
            return
        out.codes[status] += 1
        out.headers.append((status, headers))
        if on_answer is not None:
            on_answer(status, headers, body)
        if keep_alive:
            idle.append(conn)
        else:
            conn[1].close()

    total = int(rate_per_second * seconds)
    start = time.monotonic()
    for i in range(total):  # bounded by count, paced by the clock
        delay = start + i / rate_per_second - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    out.offered_seconds = time.monotonic() - start
    out.sent = total
    if tasks:
        await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return out


async def closed_loop(
    host: str,
    port: int,
    path: str,
    bodies: Sequence[bytes],
    clients: int,
    seconds: float,
    *,
    max_requests: int = 1_000_000,
) -> Counter[int]:
    """``clients`` keep-alive connections, each sending its next request when the last one is answered.

    The same cheap client as :func:`open_loop`, so a capacity measured with it and an overload offered with
    :func:`open_loop` cost the shared CPU alike. Bounded by ``seconds`` and ``max_requests``.

    Returns:
        How many answers of each status code arrived before the window closed.
    """
    requests = [build_request(f"{host}:{port}", path, b) for b in bodies]
    codes: Counter[int] = Counter()
    stop = time.monotonic() + seconds
    budget = [max_requests]

    async def client(i: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.monotonic() < stop and budget[0] > 0:
                budget[0] -= 1
                writer.write(requests[i % len(requests)])
                status, _, _, _ = await read_response(reader)
                if time.monotonic() <= stop:
                    codes[status] += 1
                i += 1
        finally:
            writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return codes
