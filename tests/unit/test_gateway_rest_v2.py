"""The Open Inference Protocol (v2) over REST through the real app factory, with the fake backend."""

from __future__ import annotations

import json

import numpy as np

from service.gateway.api import v2_codec
from tests.helpers.gateway import LABELS, TEXTS, make_settings, rest_probabilities
from tests.helpers.gateway import serve_with_grpc as serve


async def test_v2_rest_json_and_errors(repo):
    async with serve(make_settings(repo, max_client_batch_size=3)) as (client, _url, _app):
        ok = await client.post(
            "/v2/models/classifier_fp16/infer",
            json={
                "id": "r1",
                "inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["a b"], ["c"]]}],
                "outputs": [{"name": "labels"}],
            },
        )
        live = await client.get("/v2/health/live")
        ready = await client.get("/v2/health/ready")
        meta = await client.get("/v2/models/classifier")
        unknown = await client.get("/v2/models/nope")
        bad_version = await client.get("/v2/models/classifier_int8/versions/7/ready")
        too_many = await client.post(
            "/v2/models/classifier/infer",
            json={"inputs": [{"name": "text", "shape": [4], "datatype": "BYTES", "data": ["a"] * 4}]},
        )
        wrong_type = await client.post(
            "/v2/models/classifier/infer",
            json={"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
        )
        mismatch = await client.post(
            "/v2/models/classifier/infer",
            json={"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}]},
        )
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["id"] == "r1" and body["model_name"] == "classifier_fp16"
    (labels,) = body["outputs"]
    assert labels["name"] == "labels" and labels["shape"] == [2] and set(labels["data"]) <= set(LABELS)
    assert live.json() == {"live": True} and ready.json() == {"ready": True}
    assert meta.json()["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    for resp, status in ((unknown, 404), (bad_version, 404), (too_many, 413), (wrong_type, 422), (mismatch, 422)):
        assert resp.status_code == status, resp.text
        assert set(resp.json()) == {"error", "error_type"}


async def test_v2_rest_binary_tensor_data(repo):
    raw = v2_codec.encode_bytes_tensor([t.encode() for t in TEXTS])
    header = json.dumps(
        {
            "inputs": [
                {"name": "text", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    async with serve(make_settings(repo)) as (client, _url, _app):
        rest = (await client.post("/v1/classify", json={"texts": TEXTS})).json()
        resp = await client.post(
            "/v2/models/classifier/infer",
            content=header + raw,
            headers={"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"},
        )
        truncated = await client.post(
            "/v2/models/classifier/infer",
            content=header + raw[:-2],
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
    assert resp.status_code == 200, resp.text
    n = int(resp.headers["inference-header-content-length"])
    head = json.loads(resp.content[:n])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    blob = resp.content[n:]
    probs = np.frombuffer(blob[: sizes[0]], dtype="<f4").reshape(len(TEXTS), len(LABELS))
    np.testing.assert_allclose(probs, rest_probabilities(rest), atol=1e-6)
    assert [b.decode() for b in v2_codec.decode_bytes_tensor(blob[sizes[0] :], max_items=10)] == [
        r["label"] for r in rest["results"]
    ]
    assert truncated.status_code == 422
