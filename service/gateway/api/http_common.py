"""Plumbing both HTTP transports (v1 and v2 REST) share: the data plane of the app, disconnect detection, and the
call record the request-context middleware reads for its metrics."""

from __future__ import annotations

from fastapi import Request

from service.gateway.dataplane import CallInfo, DataPlane

#: The request header carrying a client deadline in milliseconds (both REST protocols).
DEADLINE_HEADER = "x-deadline-ms"


def get_dataplane(request: Request) -> DataPlane:
    """Return the application's data plane."""
    dataplane: DataPlane = request.app.state.dataplane
    return dataplane


async def wait_disconnect(request: Request) -> None:
    """Return when the HTTP client goes away.

    The body is already read (the request-context middleware reads it), so the next ASGI message is
    ``http.disconnect``: it arrives when the client leaves (or when the response is complete, by which time the
    waiting task has been cancelled). No polling.
    """
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def call_info(request: Request) -> CallInfo:
    """A CallInfo stored in the request state, where the metrics middleware reads the resolved variant."""
    info = CallInfo()
    request.state.call = info
    return info
