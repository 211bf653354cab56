"""The lean /v1/classify path answers exactly as the FastAPI route does, and takes the requests it should."""

from __future__ import annotations

import json

import pytest

from service.gateway.api import fast_classify, rest_v1
from service.gateway.backend.fake import FakeBackend
from service.gateway.errors import BackendError, BackendUnavailable
from tests.helpers.gateway import LABELS, SHORT, assert_error, make_settings, serve

JSON = {"content-type": "application/json"}

# (raw body, extra headers): valid requests, requests the lean path must hand to FastAPI, and valid requests whose
# answer is an error of the data plane (unknown variant, too many texts, a text too long).
CASES = [
    (json.dumps({"text": SHORT}), {}),
    (json.dumps({"texts": [SHORT, "Where is Rome ?", "Why ?"]}), {}),
    (json.dumps({"text": SHORT, "variant": "fp16", "deadline_ms": 5000}), {}),
    (json.dumps({"text": SHORT}), {"x-deadline-ms": "4000"}),
    (json.dumps({"text": SHORT}), {"content-type": "application/json; charset=utf-8"}),
    (json.dumps({"text": "caf\u00e9 \u2603 ?"}), {}),
    (json.dumps({"text": "\x1c"}), {}),  # whitespace to Python, not to pydantic's regex: FastAPI decides
    (json.dumps({"text": "\u3000"}), {}),
    (json.dumps({"text": " \t"}), {}),
    (json.dumps({}), {}),
    (json.dumps({"text": ""}), {}),
    (json.dumps({"text": "a", "texts": ["b"]}), {}),
    (json.dumps({"texts": []}), {}),
    (json.dumps({"texts": ["a", ""]}), {}),
    (json.dumps({"texts": "a"}), {}),
    (json.dumps({"text": 3}), {}),
    (json.dumps({"text": "a", "bogus": 1}), {}),
    (json.dumps({"text": "a", "deadline_ms": 0}), {}),
    (json.dumps({"text": "a", "deadline_ms": 3_600_001}), {}),
    (json.dumps({"text": "a", "deadline_ms": 500.0}), {}),
    (json.dumps({"text": "a", "deadline_ms": "500"}), {}),
    (json.dumps({"text": "a", "variant": 8}), {}),
    (json.dumps({"text": "a", "variant": None}), {}),
    (json.dumps({"text": "a"}), {"x-deadline-ms": "0"}),
    (json.dumps({"text": "a"}), {"x-deadline-ms": "soon"}),
    (json.dumps({"text": "a"}), {"x-deadline-ms": "99999999999"}),
    (json.dumps({"text": "a", "variant": "fp64"}), {}),
    (json.dumps({"texts": ["a"] * 65}), {}),
    (json.dumps({"text": "a" * 20_001}), {}),
    (json.dumps([{"text": "a"}]), {}),
    ("null", {}),
    ('{"text": "a",}', {}),
    ('{"text": "a"}', {"content-type": "text/plain"}),
    ('{"text": "\\ud800"}', {}),  # a lone surrogate
]


async def _answers(fast: bool) -> list[tuple[int, dict, dict[str, str]]]:
    out = []
    # Admission by deadline only: a 429 from a slow moment of a busy machine must not make the two runs differ.
    async with serve(make_settings(_answers.repo, fast_classify=fast, slo_p99_seconds=0)) as client:
        for body, headers in CASES:
            resp = await client.post("/v1/classify", content=body.encode(), headers={**JSON, **headers})
            kept = {k: resp.headers[k] for k in ("content-type", "retry-after") if k in resp.headers}
            out.append((resp.status_code, resp.json(), kept))
    return out


async def test_both_paths_answer_every_case_the_same(repo):
    _answers.repo = repo
    lean, framework = await _answers(True), await _answers(False)
    for case, a, b in zip(CASES, lean, framework, strict=True):
        assert a == b, case
    statuses = {status for status, _, _ in lean}
    assert {200, 413, 422} <= statuses  # the cases cover valid, invalid and refused requests


@pytest.mark.parametrize(
    ("payload", "decoded"),
    [
        ({"text": "a"}, (["a"], None, None, None)),
        ({"texts": ["a", "b"], "variant": "fp16", "deadline_ms": 7}, (["a", "b"], "fp16", 7, None)),
    ],
)
def test_parse_takes_certainly_valid_requests(payload, decoded):
    assert fast_classify.parse(json.dumps(payload).encode(), []) == decoded


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b'{"text": " "}', []),
        (b'{"text": "a", "deadline_ms": 1.5}', []),
        # a boolean is 1 ms to pydantic; the lean path leaves it to the same FastAPI route (comparing the two
        # answers would only race a 1 ms deadline against the fake backend)
        (b'{"text": "a", "deadline_ms": true}', []),
        (b'{"text": "a"}', [(b"content-type", b"text/plain")]),
        (b'{"text": "a"}', [(b"x-deadline-ms", b"-1")]),
        (b"not json", []),
    ],
)
def test_parse_leaves_the_rest_to_fastapi(body, headers):
    assert fast_classify.parse(body, headers) is None


async def test_valid_requests_do_not_reach_the_framework_route(repo, monkeypatch):
    """With the lean path on, a valid request never builds the pydantic response; with it off, every one does."""
    built = []
    real = rest_v1.ClassifyResponse

    def counting(**kw):
        built.append(1)
        return real(**kw)

    monkeypatch.setattr(rest_v1, "ClassifyResponse", counting)
    async with serve(make_settings(repo)) as client:
        ok = await client.post("/v1/classify", json={"texts": [SHORT, "Why ?"]})
        bad = await client.post("/v1/classify", json={"text": " "})
        metrics = (await client.get("/metrics")).text
    # Counted by the request middleware under the same labels as the framework route's requests.
    assert 'gateway_requests_total{code="200",operation="classify",protocol="rest_v1",variant="int8"} 1.0' in metrics
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2 and not built
    assert_error(bad, 422, "invalid_input")
    async with serve(make_settings(repo, fast_classify=False)) as client:
        assert (await client.post("/v1/classify", json={"text": SHORT})).status_code == 200
    assert built == [1]


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [(BackendUnavailable("triton down"), 503, "backend_unavailable"), (BackendError("bad"), 502, "backend_error")],
)
async def test_backend_errors_keep_their_status_on_the_lean_path(repo, error, status, error_type):
    backend = FakeBackend(len(LABELS), fail_with=error)
    async with serve(make_settings(repo, retry_on_unavailable=False), backend) as client:
        resp = await client.post("/v1/classify", json={"text": SHORT}, headers={"x-request-id": "r-1"})
    assert_error(resp, status, error_type)
    assert resp.headers["x-request-id"] == "r-1" and "x-total-time" in resp.headers
