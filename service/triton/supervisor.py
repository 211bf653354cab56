"""Keeps the embedded tritonserver running: restarts it (same ports) when it exits unexpectedly.

Only for ``python -m service.gateway --embedded-triton``; in Kubernetes the kubelet restarts the Triton container.
While Triton is down the gateway keeps answering: calls fail at once with 503 (the gRPC channel reports
UNAVAILABLE), /readyz is 503, and once the new server is ready the channel reconnects within
``GATEWAY_TRITON__RECONNECT_BACKOFF_MAX_SECONDS`` and traffic flows again, with no gateway restart.

One daemon thread checks the server process every WATCH_INTERVAL_SECONDS. When the process ends and no stop was
asked for, the thread reaps the old process group (orphaned python-backend stubs included) and starts a new server on
the same ports, so the gateway's gRPC URL stays valid. Failed starts back off exponentially up to a maximum.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from service.triton.launcher import TritonLaunchConfig, TritonServer, TritonStartError

logger = logging.getLogger("service.triton.supervisor")

FIRST_BACKOFF_SECONDS = 0.5
#: How often the watcher checks that tritonserver still runs (adds at most this much to the recovery time).
WATCH_INTERVAL_SECONDS = 0.2


@dataclasses.dataclass(frozen=True)
class Restart:
    """One restart, for logs and tests.

    Attributes:
        old_pid: The server that ended.
        pid: The new server's pid.
        down_seconds: From noticing the exit to the new server being ready.
    """

    old_pid: int | None
    pid: int | None
    down_seconds: float


class TritonSupervisor:
    """Owns the embedded tritonserver: start, watch, restart, stop.

    Args:
        config: Launch configuration; ports of 0 are fixed to the first start's ports for every restart.
        max_backoff_seconds: Longest pause between failed restart attempts.
        restart: Whether to restart at all (False only watches, for diagnosis).
        on_restart: Called (from the watcher thread) after each successful restart.
    """

    def __init__(
        self,
        config: TritonLaunchConfig,
        *,
        max_backoff_seconds: float = 10.0,
        restart: bool = True,
        on_restart: Callable[[Restart], None] | None = None,
    ) -> None:
        self._config = config
        self._max_backoff = max_backoff_seconds
        self._restart = restart
        self._on_restart = on_restart
        self._server: TritonServer | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.restarts: list[Restart] = []

    @property
    def server(self) -> TritonServer:
        """The current server."""
        if self._server is None:
            raise RuntimeError("the supervisor has not started a server")
        return self._server

    def start(self) -> TritonServer:
        """Start the first server (blocking until ready) and the watcher thread.

        Returns:
            The ready server.

        Raises:
            TritonStartError: The first start failed (nothing is left running).
        """
        server = TritonServer(self._config).start()
        # Every restart reuses these ports: the gateway's client keeps its URL and reconnects by itself.
        http, grpc, metrics = (
            int(u.rsplit(":", 1)[1].split("/")[0]) for u in (server.http_url, server.grpc_url, server.metrics_url)
        )
        self._config = dataclasses.replace(self._config, http_port=http, grpc_port=grpc, metrics_port=metrics)
        self._server = server
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self._thread.start()
        return server

    def _watch(self) -> None:
        while not self._stopping.is_set():
            server = self._server
            if server is None:
                return
            # The launcher exposes liveness, not the process handle: check it on a short, interruptible timer.
            while server.is_alive():
                if self._stopping.wait(WATCH_INTERVAL_SECONDS):
                    return
            if self._stopping.is_set():
                return
            noticed = time.monotonic()
            logger.error("embedded tritonserver (pid %s) exited; restarting on the same ports", server.pid)
            server.stop(timeout_seconds=1.0)  # reaps the process group: orphaned python stubs go too
            if not self._restart:
                return
            backoff = FIRST_BACKOFF_SECONDS
            while not self._stopping.is_set():
                try:
                    with self._lock:
                        if self._stopping.is_set():
                            return
                        new = TritonServer(self._config).start()
                        self._server = new
                except TritonStartError as exc:
                    logger.error(
                        "restarting tritonserver failed (next try in %.1f s): %s", backoff, str(exc).splitlines()[0]
                    )
                    if self._stopping.wait(backoff):
                        return
                    backoff = min(self._max_backoff, backoff * 2)
                    continue
                event = Restart(old_pid=server.pid, pid=new.pid, down_seconds=time.monotonic() - noticed)
                self.restarts.append(event)
                logger.warning(
                    "embedded tritonserver restarted (pid %s) %.1f s after it exited", new.pid, event.down_seconds
                )
                if self._on_restart is not None:
                    self._on_restart(event)
                break

    def stop(self) -> None:
        """Stop watching, then stop the current server (graceful, then killed). Safe to call twice."""
        self._stopping.set()
        with self._lock:  # waits for a restart in progress, which then sees the stop flag
            server = self._server
        if server is not None:
            server.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
