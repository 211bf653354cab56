"""One socket write per response: the coalescing transport under uvicorn's protocol, and a real server using it."""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from service.gateway.http_server import CoalescingHttpToolsProtocol, CoalescingTransport, http_protocol


class Recorder:
    """A transport that records its writes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default=None):
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def test_writes_in_one_turn_leave_as_one_write():
    rec = Recorder()
    t = CoalescingTransport(rec, asyncio.get_running_loop())
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(b"body")
    assert rec.writes == []  # held until the end of the turn
    await asyncio.sleep(0)
    assert rec.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    t.write(b"next")  # a later turn: its own write
    await asyncio.sleep(0)
    assert rec.writes[-1] == b"next" and len(rec.writes) == 2
    assert t.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else is the transport's


async def test_close_sends_what_is_held_first():
    rec = Recorder()
    t = CoalescingTransport(rec, asyncio.get_running_loop())
    t.writelines([b"a", b"b"])
    t.close()
    assert rec.writes == [b"ab"] and rec.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing more to send
    assert rec.writes == [b"ab"]


async def test_a_real_uvicorn_server_answers_whole_responses_over_it():
    assert http_protocol() is CoalescingHttpToolsProtocol

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http=http_protocol(), log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(100):
            if server.started:
                break
            await asyncio.sleep(0.02)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # keep-alive: a second request on the same connection
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(5) == b"hello"
        writer.close()
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
