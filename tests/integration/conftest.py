"""Integration fixtures: one real tritonserver per session, always stopped, and a check that none survives.

The model repository is the session's ``tiny_repository`` (tests/conftest.py: a real tiny build). Set
``LORASERVE_TEST_MODEL_REPOSITORY`` to an already built repository to skip the build while iterating.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from service.triton.launcher import TritonLaunchConfig, TritonServer

ENV_TEST_REPOSITORY = "LORASERVE_TEST_MODEL_REPOSITORY"
# Every process a test server starts (tritonserver and its python stubs) inherits this variable, so the
# end-of-session check finds our leftovers, even orphaned stubs, and nobody else's.
SESSION_MARKER_ENV = "LORASERVE_TEST_TRITON_SESSION"
LEFTOVER_GRACE_SECONDS = 10.0
LOG_TAIL_LINES = 80


def _marked_processes(marker: str) -> dict[int, str]:
    """PIDs (with command lines) of live processes whose environment carries ``marker``."""
    found: dict[int, str] = {}
    needle = f"{SESSION_MARKER_ENV}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] == "Z":  # a zombie is dead, only not yet reaped
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            # multiprocessing's resource tracker (started by the torch.distributed tests) is a child of this very
            # process and ends with it: not a leftover of ours.
            if int(fields[1]) == os.getpid() and "multiprocessing.resource_tracker" in cmdline:
                continue
            found[int(entry.name)] = cmdline
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_tritonserver_left_behind():
    """After the session, no tritonserver or python stub started by these tests may still run."""
    marker = uuid.uuid4().hex
    previous = os.environ.get(SESSION_MARKER_ENV)
    os.environ[SESSION_MARKER_ENV] = marker
    yield
    if previous is None:
        os.environ.pop(SESSION_MARKER_ENV, None)
    else:
        os.environ[SESSION_MARKER_ENV] = previous
    # Stubs end a moment after their server; allow a bounded grace period before calling them leftovers.
    leftovers = _marked_processes(marker)
    for _ in range(int(LEFTOVER_GRACE_SECONDS / 0.5)):
        if not leftovers:
            break
        time.sleep(0.5)
        leftovers = _marked_processes(marker)
    for pid in leftovers:  # clean up for the next run, then fail loudly
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert not leftovers, f"processes started by the tests survived the session: {leftovers}"


@pytest.fixture(scope="session")
def model_repository(request) -> Path:
    """The built model repository the integration tests serve (classifier_int8/1, classifier_fp16/1)."""
    override = os.environ.get(ENV_TEST_REPOSITORY)
    if override:
        path = Path(override)
        if not path.is_dir():
            pytest.fail(f"{ENV_TEST_REPOSITORY}={override!r} is not a directory")
        return path
    return Path(request.getfixturevalue("tiny_repository"))


@pytest.fixture(scope="session")
def triton_server(model_repository, tmp_path_factory):
    """A real tritonserver on free 127.0.0.1 ports serving ``model_repository``; stopped after the session."""
    log_path = tmp_path_factory.mktemp("tritonserver") / "tritonserver.log"
    server = TritonServer(
        TritonLaunchConfig(model_repository=model_repository, log_path=log_path, startup_timeout_seconds=180.0)
    )
    try:
        server.start()  # raises TritonStartError with the log tail
        yield server
    finally:
        server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the shared server's log tail to the report of any failing test that used it."""
    outcome = yield
    report = outcome.get_result()
    server = getattr(item, "funcargs", {}).get("triton_server")
    if report.failed and isinstance(server, TritonServer):
        report.sections.append((f"tritonserver log tail ({server.log_path})", server.log_tail(LOG_TAIL_LINES)))
