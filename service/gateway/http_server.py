"""uvicorn's HTTP/1.1 protocol with one socket write per response instead of two.

uvicorn writes a response's status line and headers as soon as the application sends ``http.response.start``, and
the body as a second write. Each write is a ``send`` system call that also wakes the client, and on a small,
shared machine the pair costs more than the rest of the request: a profile of the gateway under 3x overload
(docs/benchmarks.md) put 27% of its CPU in those two writes. :class:`CoalescingTransport` holds what is written
during one turn of the event loop and sends it as one write at the end of the turn, so a response sent in one go
(headers and a whole body, as the gateway's routes do) leaves in one system call. Streaming responses (server-sent
events) still leave chunk by chunk: each chunk is its own turn.
"""

from __future__ import annotations

import asyncio
from typing import Any

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - uvicorn without httptools: the caller keeps uvicorn's default protocol
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


class CoalescingTransport:
    """A transport proxy whose writes within one event-loop turn leave as one write.

    Everything but ``write``, ``writelines`` and ``close`` is the wrapped transport's own (flow control, extra info,
    ``is_closing``, ``abort``: an abort discards what is held, as it discards the transport's own buffer).

    Args:
        transport: The connection's transport.
        loop: The running loop (where the flush is scheduled).
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        """Hold ``data`` until the end of this turn of the loop."""
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def writelines(self, chunks: Any) -> None:
        """Hold each chunk (same as ``write`` per chunk)."""
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Send what is held now (one write)."""
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        """Send what is held, then close (a response with ``Connection: close`` still arrives whole)."""
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


if HttpToolsProtocol is not None:

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """uvicorn's httptools protocol over a :class:`CoalescingTransport`."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescingTransport(transport, asyncio.get_running_loop()))  # type: ignore[arg-type]

else:  # pragma: no cover
    CoalescingHttpToolsProtocol = None  # type: ignore[assignment,misc]


def http_protocol() -> Any:
    """The protocol class (or uvicorn's name) for ``uvicorn.Config(http=...)``."""
    return CoalescingHttpToolsProtocol or "auto"
