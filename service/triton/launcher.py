"""Start and stop a real ``tritonserver`` process for the embedded (one machine, no Docker) deployment.

The binary comes from the ``nvidia-pytriton`` wheel (Triton 2.51, python backend only). Running it outside
PyTriton needs three things this module takes care of:

* ``LD_LIBRARY_PATH`` pointing at the wheel's ``nvidia_pytriton.libs``;
* a backend directory in which ``backends/python/`` also holds the ``triton_python_backend_stub`` built for
  our Python version (the wheel keeps the stubs apart, under ``python_backend_stubs/<major.minor>/``);
* our environment's ``bin/`` first on PATH, so the stub's interpreter imports the venv's numpy and
  onnxruntime (the stub ignores PYTHONPATH).

``LORASERVE_TRITONSERVER`` overrides the binary (for example ``/opt/tritonserver/bin/tritonserver`` in
NVIDIA's container); that installation's own backend directory and libraries are then used unchanged.

Every server runs in its own process group, logs to a file, binds 127.0.0.1 only, and is stopped at
interpreter exit if its owner forgot; when started from the main thread it is also killed by the kernel if
this process dies without running its exit handlers (``setpriv --pdeathsig``).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

ENV_TRITONSERVER = "LORASERVE_TRITONSERVER"
LOOPBACK = "127.0.0.1"
# Ports picked as "free" can be taken by someone else before tritonserver binds them; retry a few times.
MAX_PORT_ATTEMPTS = 3
READY_POLL_SECONDS = 0.25
EXIT_TIMEOUT_SECONDS = 10
GROUP_EXIT_CHECKS = 50
GROUP_EXIT_POLL_SECONDS = 0.1
_LOG_TAIL_BYTES = 256 * 1024


class TritonStartError(RuntimeError):
    """tritonserver did not become ready; the message ends with the tail of its log."""


@dataclass
class TritonLaunchConfig:
    """How to launch one tritonserver.

    Attributes:
        model_repository: Directory of ``<model>/config.pbtxt`` + ``<model>/<version>/``.
        models: Models to load; ``None`` loads every model of the repository. Otherwise the server runs with
            ``--model-control-mode=explicit`` and one ``--load-model`` per name.
        http_port: HTTP port on 127.0.0.1; 0 picks a free one.
        grpc_port: gRPC port on 127.0.0.1; 0 picks a free one.
        metrics_port: Prometheus metrics port on 127.0.0.1; 0 picks a free one.
        log_path: Server log file; ``None`` creates a temporary file that is kept for diagnosis.
        startup_timeout_seconds: How long ``start()`` waits for ``/v2/health/ready``.
        extra_args: Further tritonserver arguments, appended last (so they win over ours).
    """

    model_repository: Path
    models: tuple[str, ...] | None = None
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    log_path: Path | None = None
    startup_timeout_seconds: float = 120.0
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Installation:
    binary: Path
    backend_directory: Path | None  # None: the binary's own default (NVIDIA container)
    library_path: Path | None


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError(
            "nvidia-pytriton is not installed (pip install '.[triton]'), and "
            f"{ENV_TRITONSERVER} does not name a tritonserver binary"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _prepare_backend_directory(tritonserver_dir: Path) -> Path:
    """Return a cached copy of the wheel's backends with the python stub for this interpreter added.

    The cache key covers the wheel location, the stub's size and mtime and the Python version, so an upgraded
    wheel or interpreter gets a fresh directory. The copy is built under a temporary name and renamed into
    place, so concurrent starters never see a half-built directory.
    """
    py_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tritonserver_dir / "python_backend_stubs" / py_version / "triton_python_backend_stub"
    source = tritonserver_dir / "backends"
    if not stub.is_file():
        raise TritonStartError(f"no python backend stub for Python {py_version} at {stub}")
    stat = stub.stat()
    key = hashlib.sha256(f"{tritonserver_dir}|{stat.st_size}|{stat.st_mtime_ns}|{py_version}".encode()).hexdigest()
    cache_root = Path(tempfile.gettempdir()) / f"loraserve-triton-{os.getuid()}"
    target = cache_root / f"backends-{key[:16]}"
    if (target / "python" / "triton_python_backend_stub").is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="backends-staging-", dir=cache_root))
    try:
        built = staging / "backends"
        shutil.copytree(source, built, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, built / "python" / "triton_python_backend_stub")
        try:
            os.rename(built, target)
        except OSError:
            # Another process won the race; its directory is equivalent.
            if not (target / "python" / "triton_python_backend_stub").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def find_installation() -> _Installation:
    """Locate the tritonserver binary, its backend directory and libraries.

    Returns:
        The installation to run.

    Raises:
        TritonStartError: If no binary can be found.
    """
    override = os.environ.get(ENV_TRITONSERVER, "").strip()
    if override:
        binary = Path(override)
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise TritonStartError(f"{ENV_TRITONSERVER}={override!r} is not an executable file")
        return _Installation(binary=binary, backend_directory=None, library_path=None)
    root = _pytriton_root()
    tritonserver_dir = root / "tritonserver"
    binary = tritonserver_dir / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonStartError(f"nvidia-pytriton is installed but {binary} is missing")
    libs = root.parent / "nvidia_pytriton.libs"
    return _Installation(
        binary=binary,
        backend_directory=_prepare_backend_directory(tritonserver_dir),
        library_path=libs if libs.is_dir() else None,
    )


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open until every port is chosen, so the same port is not handed out twice.
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


_live_servers: set[TritonServer] = set()
_live_lock = threading.Lock()


def _stop_all_at_exit() -> None:
    with _live_lock:
        servers = list(_live_servers)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout_seconds=5.0)


atexit.register(_stop_all_at_exit)


class TritonServer:
    """One tritonserver process: ``start()`` blocks until ready, ``stop()`` drains and always reaps it.

    Example:
        >>> with TritonServer(TritonLaunchConfig(Path("model_repository"))) as server:  # doctest: +SKIP
        ...     print(server.grpc_url)
    """

    def __init__(self, config: TritonLaunchConfig):
        """Prepare (not start) a server.

        Args:
            config: Launch settings; ports of 0 are resolved to free ports by ``start()``.
        """
        self.config = config
        self._process: subprocess.Popen[bytes] | None = None
        self._ports: tuple[int, int, int] | None = None
        self._log_path: Path | None = config.log_path
        self._lock = threading.Lock()

    # -- addresses -------------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The tritonserver process id while one was started (kept after stop for diagnosis), else None."""
        return self._process.pid if self._process is not None else None

    def _port(self, index: int) -> int:
        configured = (self.config.http_port, self.config.grpc_port, self.config.metrics_port)[index]
        if self._ports is not None:
            return self._ports[index]
        if configured:
            return configured
        raise RuntimeError("the port is chosen by start(); start the server first")

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the KServe v2 HTTP endpoint."""
        return f"http://{LOOPBACK}:{self._port(0)}"

    @property
    def grpc_url(self) -> str:
        """``127.0.0.1:PORT`` of the gRPC endpoint (tritonclient's ``url`` form, no scheme)."""
        return f"{LOOPBACK}:{self._port(1)}"

    @property
    def metrics_url(self) -> str:
        """``http://127.0.0.1:PORT/metrics`` (Prometheus text format)."""
        return f"http://{LOOPBACK}:{self._port(2)}/metrics"

    @property
    def log_path(self) -> Path | None:
        """The server log file (set once ``start()`` ran)."""
        return self._log_path

    # -- lifecycle -------------------------------------------------------------------------------------------

    def _command(self, installation: _Installation, ports: tuple[int, int, int]) -> list[str]:
        http_port, grpc_port, metrics_port = ports
        command = [
            str(installation.binary),
            f"--model-repository={Path(self.config.model_repository).resolve()}",
            f"--http-address={LOOPBACK}",
            f"--http-port={http_port}",
            f"--grpc-address={LOOPBACK}",
            f"--grpc-port={grpc_port}",
            f"--metrics-address={LOOPBACK}",
            f"--metrics-port={metrics_port}",
            # Our config.pbtxt files are complete and validated; do not let backends rewrite them.
            "--disable-auto-complete-config",
            # A model that fails to load fails the start, with the reason in the log.
            "--exit-on-error=true",
            "--strict-readiness=true",
            # Triton waits this long for in-flight requests and open client connections on SIGTERM; keep it
            # inside stop()'s default 15 s so a graceful drain is not cut short by SIGKILL.
            f"--exit-timeout-secs={EXIT_TIMEOUT_SECONDS}",
        ]
        if installation.backend_directory is not None:
            command.append(f"--backend-directory={installation.backend_directory}")
        if self.config.models is not None:
            command.append("--model-control-mode=explicit")
            command.extend(f"--load-model={name}" for name in self.config.models)
        command.extend(self.config.extra_args)
        # With no owner left, the kernel kills the server (only reliable when the forking thread is the main
        # thread, which lives as long as the process).
        if threading.current_thread() is threading.main_thread() and shutil.which("setpriv"):
            command = ["setpriv", "--pdeathsig", "KILL", "--", *command]
        return command

    def _environment(self, installation: _Installation) -> dict[str, str]:
        env = dict(os.environ)
        # The python backend stub runs "python" from PATH; ours must come first so it sees our packages.
        env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", "")])
        if installation.library_path is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(installation.library_path), env.get("LD_LIBRARY_PATH", "")) if p
            )
        return env

    def start(self) -> TritonServer:
        """Start tritonserver and wait until ``/v2/health/ready`` answers 200.

        Returns:
            ``self``, ready to serve.

        Raises:
            TritonStartError: If the repository is missing, the binary cannot be found, the process exits, or
                it is not ready within ``startup_timeout_seconds``; the process is killed first, and the
                message ends with the tail of the log.
            RuntimeError: If this server is already running.
        """
        with self._lock:
            if self.is_alive():
                raise RuntimeError(f"tritonserver already running (pid {self.pid})")
            repository = Path(self.config.model_repository)
            if not repository.is_dir():
                raise TritonStartError(f"model repository {repository} is not a directory")
            installation = find_installation()
            if self._log_path is None:
                handle, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
                os.close(handle)
                self._log_path = Path(name)
            # Retrying helps only when every port is ours to choose; a fixed port that is taken stays taken.
            auto_ports = not (self.config.http_port or self.config.grpc_port or self.config.metrics_port)
            attempts = MAX_PORT_ATTEMPTS if auto_ports else 1
            for attempt in range(1, attempts + 1):
                try:
                    self._start_once(installation)
                    return self
                except TritonStartError as error:
                    port_clash = "already in use" in str(error) or "Address in use" in str(error)
                    if not (port_clash and attempt < attempts):
                        raise
                    logger.warning("tritonserver port clash, retrying with new ports (attempt %d)", attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_once(self, installation: _Installation) -> None:
        free = iter(_free_ports(3))
        self._ports = (
            self.config.http_port or next(free),
            self.config.grpc_port or next(free),
            self.config.metrics_port or next(free),
        )
        assert self._log_path is not None
        command = self._command(installation, self._ports)
        with open(self._log_path, "ab") as log_file:
            log_file.write(f"\n=== loraserve launcher: {' '.join(command)}\n".encode())
            log_file.flush()
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._environment(installation),
                start_new_session=True,  # own process group: stop() can kill the python stubs with it
            )
        with _live_lock:
            _live_servers.add(self)
        logger.info("tritonserver pid %d starting, log %s", self._process.pid, self._log_path)
        try:
            self._wait_ready()
        except BaseException as error:
            self._kill()
            if isinstance(error, TritonStartError):
                raise TritonStartError(
                    f"{error}\n--- tritonserver log tail ({self._log_path}) ---\n{self.log_tail()}"
                ) from None
            raise

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.config.startup_timeout_seconds
        ready_url = f"{self.http_url}/v2/health/ready"
        # Bounded twice: by the number of checks and by the clock (a hanging probe also uses up time).
        for _ in range(max(1, int(self.config.startup_timeout_seconds / READY_POLL_SECONDS))):
            if time.monotonic() > deadline:
                break
            # Waiting on the process both paces the loop and notices an early exit at once.
            try:
                code = self._process.wait(timeout=READY_POLL_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            else:
                raise TritonStartError(f"tritonserver exited with code {code} before it was ready")
            try:
                with urllib.request.urlopen(ready_url, timeout=2.0) as response:
                    if response.status == 200:
                        logger.info("tritonserver ready at %s", self.http_url)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                continue
        raise TritonStartError(
            f"tritonserver not ready after {self.config.startup_timeout_seconds:.0f} s ({ready_url})"
        )

    def _kill(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10.0)
        self._wait_group_gone(process.pid)
        with _live_lock:
            _live_servers.discard(self)

    @staticmethod
    def _wait_group_gone(pgid: int) -> None:
        """Make sure nothing of the server's process group (python stubs included) outlives it.

        Killed stubs take a few milliseconds to exit; a stub still there after its server ended is an orphan
        and is killed. Bounded: GROUP_EXIT_CHECKS x GROUP_EXIT_POLL_SECONDS.
        """
        for _ in range(GROUP_EXIT_CHECKS):
            try:
                os.killpg(pgid, 0)  # signal 0: does any member still exist?
            except (ProcessLookupError, PermissionError):
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(GROUP_EXIT_POLL_SECONDS)
        logger.warning("processes of tritonserver group %d still exist (unreaped zombies?)", pgid)

    def stop(self, timeout_seconds: float = 15.0) -> None:
        """Stop the server: SIGTERM (Triton drains in-flight requests), then SIGKILL to its process group.

        Safe to call more than once, and on a server that never started or already died.

        Args:
            timeout_seconds: How long to wait for the graceful exit before killing.
        """
        with self._lock:
            process = self._process
            if process is None:
                return
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    # Only the server itself: it unloads the models and ends its python stubs in order.
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=timeout_seconds)
                except subprocess.TimeoutExpired:
                    logger.warning("tritonserver pid %d did not exit in %.0f s; killing", process.pid, timeout_seconds)
            self._kill()

    def is_alive(self) -> bool:
        """Whether the tritonserver process is running (not whether it is ready)."""
        return self._process is not None and self._process.poll() is None

    def log_tail(self, n_lines: int = 50) -> str:
        """The last ``n_lines`` lines of the server log ('' if there is no log yet)."""
        if self._log_path is None or not self._log_path.is_file():
            return ""
        with open(self._log_path, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            size = log_file.tell()
            log_file.seek(max(0, size - _LOG_TAIL_BYTES))
            text = log_file.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-n_lines:])

    def __enter__(self) -> TritonServer:  # noqa: PYI034 - returns the server itself
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else "stopped"
        return f"TritonServer(pid={self.pid}, {state}, repository={self.config.model_repository})"
