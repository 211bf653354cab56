"""The chart's ``generation.kvCache`` values reach the model: ``LORASERVE_GENERATOR_*`` in Triton's environment
override the published config's budget, and the gateway exports the engine's budget, not the config's."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.gateway.app import create_app
from service.gateway.backend.fake import FakeBackend
from tests.generator.conftest import MODEL, SERVING_LIMITS, make_settings
from tests.helpers.gateway import LABELS

pytestmark = pytest.mark.integration

BUDGET = 3 * 1024 * 1024  # not the published 24 MiB


async def test_environment_overrides_the_kv_budget(combined_repository, generator_repository, tmp_path, monkeypatch):
    from service.triton.launcher import TritonLaunchConfig, TritonServer

    assert BUDGET != SERVING_LIMITS.max_kv_cache_bytes
    monkeypatch.setenv("LORASERVE_GENERATOR_MAX_KV_CACHE_BYTES", str(BUDGET))
    monkeypatch.setenv("LORASERVE_GENERATOR_MAX_ACTIVE_SEQUENCES", "3")
    monkeypatch.setenv("GATEWAY_GENERATE__ENABLED", "1")
    server = TritonServer(
        TritonLaunchConfig(
            model_repository=generator_repository, log_path=tmp_path / "t.log", startup_timeout_seconds=180
        )
    )
    server.start()
    try:
        app = create_app(make_settings(combined_repository, server), FakeBackend(len(LABELS)))
        async with app.router.lifespan_context(app):
            stats = await app.state.generation.client.stats(MODEL)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                text = (await client.get("/metrics")).text
    finally:
        server.stop()
    assert stats["max_kv_cache_bytes"] == BUDGET
    budget = [
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "gateway_generate_kv_cache_budget_bytes"
    ]
    assert budget == [BUDGET]
