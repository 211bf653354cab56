"""Optional API-key authentication (issue 8, point 7): REST and gRPC, probes exempt, off by default."""

from __future__ import annotations

import grpc
import pytest
import tritonclient.grpc.aio as grpcaio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from service.gateway.api.auth import KeyChecker, presented_key
from service.gateway.errors import PermissionDenied, Unauthenticated
from service.gateway.settings import Settings
from tests.helpers.gateway import make_settings, text_input
from tests.helpers.gateway import serve_with_grpc as serve

KEY = "k" * 8 + "-secret-0001"
OTHER = "o" * 8 + "-secret-0002"


def test_settings_validate_keys_without_echoing_them():
    assert Settings().api_keys == ()
    with pytest.raises(ValidationError) as info:
        Settings(api_keys="short-key")
    assert "short-key" not in str(info.value)
    assert [k.get_secret_value() for k in Settings(api_keys=f"{KEY}, {OTHER}").api_keys] == [KEY, OTHER]


def test_key_checker_and_header_forms():
    checker = KeyChecker(Settings(api_keys=f"{KEY},{OTHER}").api_keys)
    checker.check(KEY)
    checker.check(OTHER)
    with pytest.raises(Unauthenticated):
        checker.check(None)
    with pytest.raises(PermissionDenied):
        checker.check(KEY[:-1])
    assert presented_key([("authorization", f"Bearer {KEY}")]) == KEY
    assert presented_key([("x-api-key", KEY)]) == KEY
    assert presented_key([("authorization", f"Basic {KEY}")]) is None


async def test_rest_401_403_200_and_exempt_paths(repo):
    async with serve(make_settings(repo, api_keys=KEY)) as (client, _url, _app):
        missing = await client.post("/v1/classify", json={"text": "a ?"})
        wrong = await client.post("/v1/classify", json={"text": "a ?"}, headers={"x-api-key": OTHER})
        ok = await client.post("/v1/classify", json={"text": "a ?"}, headers={"authorization": f"Bearer {KEY}"})
        v2_missing = await client.get("/v2/models/classifier")
        docs = await client.get("/openapi.json")
        exempt = [await client.get(p) for p in ("/healthz", "/readyz", "/health/live", "/v2/health/ready", "/metrics")]
    assert missing.status_code == 401 and missing.json()["error_type"] == "unauthenticated"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert wrong.status_code == 403 and wrong.json()["error_type"] == "forbidden"
    assert KEY not in wrong.text and OTHER not in wrong.text
    assert ok.status_code == 200
    assert v2_missing.status_code == 401 and docs.status_code == 401
    assert [r.status_code for r in exempt] == [200] * len(exempt)


async def test_grpc_unauthenticated_permission_denied_ok_and_health_exempt(repo):
    async with serve(make_settings(repo, api_keys=KEY)) as (_client, url, _app):
        client = grpcaio.InferenceServerClient(url)
        try:
            with pytest.raises(InferenceServerException) as missing:
                await client.infer("classifier", [text_input(["a ?"])])
            with pytest.raises(InferenceServerException) as wrong:
                await client.infer("classifier", [text_input(["a ?"])], headers={"x-api-key": OTHER})
            ok = await client.infer("classifier", [text_input(["a ?"])], headers={"authorization": f"Bearer {KEY}"})
        finally:
            await client.close()
        channel = grpc.aio.insecure_channel(url)
        try:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        finally:
            await channel.close()
    assert missing.value.status() == "StatusCode.UNAUTHENTICATED"
    assert wrong.value.status() == "StatusCode.PERMISSION_DENIED"
    assert ok.as_numpy("labels").shape == (1,)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_auth_is_off_by_default(repo):
    async with serve(make_settings(repo)) as (client, _url, _app):
        assert (await client.post("/v1/classify", json={"text": "a ?"})).status_code == 200
