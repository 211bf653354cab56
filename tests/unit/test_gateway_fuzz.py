"""Schema-driven fuzzing of the gateway's OpenAPI spec with schemathesis (issue 8, scenario 5).

The real app (fake backend) serves its own /openapi.json; schemathesis generates valid and invalid requests for
every documented operation, and every answer must be a non-5xx with the gateway's error shape. Bounded:
max_examples per operation, no shrinking deadline surprises, no network (ASGI in process).
"""

from __future__ import annotations

import asyncio
import threading

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings

from service.gateway.app import create_app
from service.gateway.backend.fake import FakeBackend, write_fake_repository
from service.gateway.settings import Settings
from tests.helpers.gateway import LABELS, base_tokenizer_json
from tests.helpers.reliability import record

MAX_EXAMPLES = 40


def _app(tmp_root):
    repo = write_fake_repository(tmp_root / "repo", base_tokenizer_json(), labels=LABELS)
    settings = Settings(triton={"model_repository": repo}, batch={"max_wait_seconds": 0.0}, grpc_port=-1)
    return create_app(settings, FakeBackend(len(LABELS)))


class _LifespanThread:
    """Runs the app's lifespan on its own event loop thread, as uvicorn would, for the synchronous fuzzer."""

    def __init__(self, app) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        started = threading.Event()

        async def run() -> None:
            self._stop = asyncio.Event()
            async with self.app.router.lifespan_context(self.app):
                started.set()
                await self._stop.wait()

        self._future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        assert started.wait(30), "lifespan did not start"
        return self

    def __exit__(self, *exc) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._future.result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def test_openapi_fuzzing_finds_no_server_error(tmp_path_factory):
    app = _app(tmp_path_factory.mktemp("fuzz"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    calls = 0

    with _LifespanThread(app) as running:
        # The batchers live on the lifespan loop; requests must run there too.
        def call(case) -> None:
            nonlocal calls

            async def go():
                import httpx

                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                    kwargs = case.as_transport_kwargs(base_url="http://gateway")
                    kwargs.pop("base_url", None)
                    return await client.request(
                        **{
                            k: v
                            for k, v in kwargs.items()
                            if k in ("method", "url", "headers", "params", "json", "content")
                        }
                    )

            resp = asyncio.run_coroutine_threadsafe(go(), running.loop).result(timeout=30)
            calls += 1
            if resp.status_code >= 500 and resp.status_code != 503 and resp.status_code != 504:
                failures.append(f"{case.method} {case.path} -> {resp.status_code}: {resp.text[:200]}")
            if resp.status_code >= 400 and resp.headers.get("content-type", "").startswith("application/json"):
                body = resp.json()
                if not (isinstance(body, dict) and {"error", "error_type"} <= set(body)):
                    failures.append(f"{case.method} {case.path} -> {resp.status_code} without the error shape")

        for result in schema.get_all_operations():
            operation = result.ok()
            strategy = operation.as_strategy()

            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def run(case) -> None:
                call(case)

            run()
    record("hostile_input", {"fuzz_requests": calls, "fuzz_failures": len(failures)})
    assert calls >= MAX_EXAMPLES
    # schemathesis' not_a_server_error, applied by hand (503/504 are documented answers, not crashes), plus the
    # error body shape on every JSON 4xx/5xx.
    assert not failures, failures[:10]
