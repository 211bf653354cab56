"""Hostile input against the real app and real Triton (issue 8, scenario 5): documented 4xx, never a 5xx.

The schema-driven fuzzing of the whole OpenAPI spec is tests/unit/test_gateway_fuzz.py (fake backend, many cases);
here every case is a hand-written hostile request sent through the app wired to the real tritonserver.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.helpers.gateway_process import gateway_client, gateway_settings
from tests.helpers.reliability import record

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
JSON = {"content-type": "application/json"}

# (name, method, path, kwargs for httpx, expected status)
CASES: list[tuple[str, str, str, dict, int]] = [
    ("empty text", "POST", "/v1/classify", {"json": {"text": ""}}, 422),
    ("whitespace-only text", "POST", "/v1/classify", {"json": {"text": " \t\n "}}, 422),
    ("whitespace in a list", "POST", "/v1/classify", {"json": {"texts": ["ok ?", "   "]}}, 422),
    ("megabyte text (body limit)", "POST", "/v1/classify", {"json": {"text": "a" * MIB}}, 413),
    ("text over max_text_chars", "POST", "/v1/classify", {"json": {"text": "word " * 5000}}, 413),
    ("thousands of texts", "POST", "/v1/classify", {"json": {"texts": ["hi"] * 5000}}, 413),
    ("text is a number", "POST", "/v1/classify", {"json": {"text": 42}}, 422),
    ("texts is a string", "POST", "/v1/classify", {"json": {"texts": "abc"}}, 422),
    ("texts holds numbers", "POST", "/v1/classify", {"json": {"texts": [1, 2]}}, 422),
    ("body is a list", "POST", "/v1/classify", {"json": ["a"]}, 422),
    ("body is null", "POST", "/v1/classify", {"content": b"null", "headers": JSON}, 422),
    ("invalid UTF-8", "POST", "/v1/classify", {"content": b'{"text": "\xff\xfe"}', "headers": JSON}, 422),
    ("truncated JSON", "POST", "/v1/classify", {"content": b'{"text": "a', "headers": JSON}, 422),
    ("deeply nested JSON", "POST", "/v1/classify", {"content": b"[" * 5000 + b"]" * 5000, "headers": JSON}, 422),
    ("unknown field", "POST", "/v1/classify", {"json": {"text": "a", "admin": True}}, 422),
    ("unknown variant", "POST", "/v1/classify", {"json": {"text": "a", "variant": "fp64"}}, 422),
    ("variant injection", "POST", "/v1/classify", {"json": {"text": "a", "variant": "../../etc"}}, 422),
    ("deadline zero", "POST", "/v1/classify", {"json": {"text": "a", "deadline_ms": 0}}, 422),
    ("deadline negative", "POST", "/v1/classify", {"json": {"text": "a", "deadline_ms": -5}}, 422),
    ("deadline absurd", "POST", "/v1/classify", {"json": {"text": "a", "deadline_ms": 10**18}}, 422),
    ("deadline float", "POST", "/v1/classify", {"json": {"text": "a", "deadline_ms": 1.5}}, 422),
    (
        "deadline header text",
        "POST",
        "/v1/classify",
        {"json": {"text": "a"}, "headers": {"x-deadline-ms": "soon"}},
        422,
    ),
    ("deadline 1 ms", "POST", "/v1/classify", {"json": {"text": "a", "deadline_ms": 1}}, 504),
    ("control characters", "POST", "/v1/classify", {"json": {"text": "a\u0000b\u202e\ufeff?"}}, 200),
    ("emoji and scripts", "POST", "/v1/classify", {"json": {"text": "¿Dónde está Roma? 東京 🚀"}}, 200),
    ("long text at the limit", "POST", "/v1/classify", {"json": {"text": "why " * 4999}}, 200),
    (
        "v2 wrong datatype",
        "POST",
        "/v2/models/classifier/infer",
        {"json": {"inputs": [{"name": "text", "shape": [1], "datatype": "INT64", "data": [1]}]}},
        422,
    ),
    (
        "v2 shape lies",
        "POST",
        "/v2/models/classifier/infer",
        {"json": {"inputs": [{"name": "text", "shape": [100000], "datatype": "BYTES", "data": ["a"]}]}},
        413,
    ),
    (
        "v2 negative shape",
        "POST",
        "/v2/models/classifier/infer",
        {"json": {"inputs": [{"name": "text", "shape": [-1], "datatype": "BYTES", "data": ["a"]}]}},
        422,
    ),
    (
        "v2 bad binary length",
        "POST",
        "/v2/models/classifier/infer",
        {"content": b"{}", "headers": {"Inference-Header-Content-Length": "999"}},
        422,
    ),
    ("v2 unknown model", "POST", "/v2/models/secret/infer", {"json": {"inputs": []}}, 404),
    (
        "v2 blank text",
        "POST",
        "/v2/models/classifier/infer",
        {"json": {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [" "]}]}},
        422,
    ),
]


async def test_hostile_input_gets_documented_4xx_never_5xx(triton_server, model_repository):
    settings = gateway_settings(model_repository, triton_server.grpc_url)
    outcomes: Counter[str] = Counter()
    wrong: list[tuple[str, int, int, str]] = []
    async with gateway_client(settings) as client:
        for name, method, path, kwargs, expected in CASES:
            resp = await client.request(method, path, **kwargs)
            outcomes[str(resp.status_code)] += 1
            if resp.status_code != expected:
                wrong.append((name, expected, resp.status_code, resp.text[:200]))
            if resp.status_code != 200:
                assert set(resp.json()) == {"error", "error_type"}, name
        still_fine = await client.post("/v1/classify", json={"text": "Who wrote Hamlet ?"})
    record(
        "hostile_input",
        {
            "cases": len(CASES),
            "answered": dict(outcomes),
            "unexpected": len(wrong),
            "server_errors_5xx": sum(v for k, v in outcomes.items() if k.startswith("5") and k != "504"),
            "lost": 0,
        },
    )
    assert not wrong, wrong
    assert still_fine.status_code == 200
