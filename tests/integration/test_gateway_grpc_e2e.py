"""Standard v2 clients against the gateway process in front of the real tritonserver.

tritonclient.http and tritonclient.grpc, sync and asyncio, are used exactly as they would be against Triton itself
(only the URL changes) and must get the answers /v1/classify gives. Request counts stay small: 2 cores.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.gateway_process import GatewayProcess

pytestmark = pytest.mark.integration

TEXTS = ["Who wrote Hamlet ?", "Where is Rome ?", "What is a meteor ?"]
GRPC_LINE = re.compile(r"gateway gRPC .* at (127\.0\.0\.1:\d+)")
# Same texts, same padded batch, same model: only float formatting differs between the protocols.
ATOL = 1e-5


@pytest.fixture(scope="module")
def gateway(triton_server, model_repository, tmp_path_factory):
    """One gateway process (HTTP and gRPC on free ports) for this module; yields (http_url, grpc_url)."""
    env = {
        "GATEWAY_TRITON__GRPC_URL": triton_server.grpc_url,
        "GATEWAY_TRITON__MODEL_REPOSITORY": str(model_repository),
        "GATEWAY_GRPC_PORT": "0",
        "GATEWAY_DRAIN_GRACE_SECONDS": "0",
        "GATEWAY_BATCH__MAX_WAIT_SECONDS": "0.3",
        "GATEWAY_BATCH__FLUSH_WHEN_IDLE": "false",
    }
    gw = GatewayProcess([], env, tmp_path_factory.mktemp("gw-grpc") / "gateway.log")
    try:
        url = gw.wait_ready(90)
        match = GRPC_LINE.search(gw.log())
        assert match, gw.log()[-2000:]
        yield url, match.group(1)
    finally:
        gw.stop()


def _rest(url: str, texts: list[str], variant: str = "int8") -> tuple[np.ndarray, list[str], list[str]]:
    body = httpx.post(f"{url}/v1/classify", json={"texts": texts, "variant": variant}, timeout=30).json()
    labels = httpx.get(f"{url}/v1/models", timeout=10).json()["models"][0]["labels"]
    probs = np.array([[r["probabilities"][lbl] for lbl in labels] for r in body["results"]])
    return probs, [r["label"] for r in body["results"]], labels


def _sample(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_sync_clients_match_v1_classify(gateway):
    http_url, grpc_url = gateway
    probs, labels, label_order = _rest(http_url, TEXTS)

    hclient = httpclient.InferenceServerClient(http_url.removeprefix("http://"))
    try:
        assert hclient.is_server_live() and hclient.is_server_ready() and hclient.is_model_ready("classifier_int8")
        assert hclient.get_model_metadata("classifier")["platform"] == "loraserve_gateway"
        tensor = httpclient.InferInput("text", [len(TEXTS)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))  # binary by default
        http_result = hclient.infer("classifier_int8", [tensor])
        json_tensor = httpclient.InferInput("text", [len(TEXTS), 1], "BYTES")
        json_tensor.set_data_from_numpy(np.array([[t] for t in TEXTS], dtype=object), binary_data=False)
        json_result = hclient.infer(
            "classifier",
            [json_tensor],
            outputs=[
                httpclient.InferRequestedOutput("probabilities", binary_data=False),
                httpclient.InferRequestedOutput("labels", binary_data=False),
            ],
        )
    finally:
        hclient.close()

    gclient = grpcclient.InferenceServerClient(grpc_url)
    try:
        assert gclient.is_server_ready() and gclient.is_model_ready("classifier")
        tensor = grpcclient.InferInput("text", [len(TEXTS)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
        grpc_result = gclient.infer("classifier", [tensor], client_timeout=30)
    finally:
        gclient.close()

    for result in (http_result, json_result, grpc_result):
        np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=ATOL)
        got = [b.decode() if isinstance(b, bytes) else b for b in result.as_numpy("labels").reshape(-1)]
        assert got == labels
    assert len(label_order) == probs.shape[1]


async def test_asyncio_clients_match_v1_classify(gateway):
    http_url, grpc_url = gateway
    probs, labels, _ = _rest(http_url, TEXTS, variant="fp16")

    hclient = httpaio.InferenceServerClient(http_url.removeprefix("http://"))
    try:
        tensor = httpaio.InferInput("text", [len(TEXTS)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
        http_result = await hclient.infer("classifier", [tensor], parameters={"variant": "fp16"})
    finally:
        await hclient.close()

    gclient = grpcaio.InferenceServerClient(grpc_url)
    try:
        assert await gclient.is_server_live()
        tensor = grpcaio.InferInput("text", [len(TEXTS)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
        grpc_result = await gclient.infer("classifier_fp16", [tensor], client_timeout=30)
    finally:
        await gclient.close()

    for result in (http_result, grpc_result):
        np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=ATOL)
        assert [b.decode() for b in result.as_numpy("labels")] == labels


async def test_concurrent_grpc_and_rest_share_batches(gateway):
    http_url, grpc_url = gateway
    before = httpx.get(f"{http_url}/metrics", timeout=10).text  # noqa: ASYNC210 - a blocking client on purpose, outside the server loop
    n = 4  # per protocol; one text each; the gateway waits up to 0.3 s for companions

    async def rest(client: httpx.AsyncClient, i: int) -> int:
        return (await client.post("/v1/classify", json={"text": f"Who painted picture {i} ?"})).status_code

    async def rpc(client: grpcaio.InferenceServerClient, i: int) -> str:
        tensor = grpcaio.InferInput("text", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([f"Where is city {i} ?".encode()], dtype=object))
        result = await client.infer("classifier", [tensor], client_timeout=30)
        return result.as_numpy("labels")[0].decode()

    gclient = grpcaio.InferenceServerClient(grpc_url)
    await gclient.is_server_live()  # connect first, so both protocols start at the same time
    try:
        async with httpx.AsyncClient(base_url=http_url, timeout=30) as hclient:
            results = await asyncio.gather(*(rest(hclient, i) for i in range(n)), *(rpc(gclient, i) for i in range(n)))
    finally:
        await gclient.close()
    after = httpx.get(f"{http_url}/metrics", timeout=10).text  # noqa: ASYNC210 - a blocking client on purpose, outside the server loop
    assert results[:n] == [200] * n and all(isinstance(label, str) for label in results[n:])

    def delta(name: str, **labels: str) -> float:
        return _sample(after, name, variant="int8", **labels) - _sample(before, name, variant="int8", **labels)

    batches, rows = delta("gateway_batch_size_count"), delta("gateway_batch_size_sum")
    assert rows == 2 * n and batches < 2 * n
    # A batch of more than n rows cannot come from one protocol alone (n requests of one text each per protocol).
    assert delta("gateway_batch_size_bucket", le=str(float(n))) < batches
    grpc_ok = _sample(
        after, "gateway_requests_total", operation="classify", protocol="grpc", variant="int8", code="200"
    )
    assert grpc_ok >= n


def test_grpc_errors_against_real_triton(gateway):
    _, grpc_url = gateway
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        tensor = grpcclient.InferInput("text", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([b"\xff not utf-8"], dtype=object))
        with pytest.raises(grpcclient.InferenceServerException) as bad:
            client.infer("classifier", [tensor])
        with pytest.raises(grpcclient.InferenceServerException) as missing:
            client.get_model_metadata("classifier_fp64")
    finally:
        client.close()
    assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert missing.value.status() == "StatusCode.NOT_FOUND"
