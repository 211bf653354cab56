"""The benchmark's many-texts scenario: which texts a request carries, and how rounds are summarized and shown."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import compare
import gateway_bench as gb


def test_a_request_carries_the_question_and_the_next_ones_wrapping_around():
    texts = gb.many(3)
    assert texts(gb.QUESTIONS[0]) == gb.QUESTIONS[:3]
    last = gb.QUESTIONS[-1]
    assert texts(last) == [last, gb.QUESTIONS[0], gb.QUESTIONS[1]]


def test_rounds_are_summarized_as_medians_with_the_share_of_the_ceiling():
    rounds = [
        {
            "contender": "gateway-int8",
            "concurrency": 4,
            "texts_per_request": 32,
            "texts_per_second": tps,
            "p50_ms": p50,
            "p99_ms": p50 * 2,
            "errors": 0,
            "mean_batch": 24.0,
        }
        for tps, p50 in ((600.0, 10.0), (800.0, 30.0), (700.0, 20.0))
    ] + [
        {
            "contender": "triton",
            "concurrency": 4,
            "texts_per_request": 32,
            "texts_per_second": 500.0,
            "p50_ms": 40.0,
            "p99_ms": 90.0,
            "errors": 1,
            "mean_batch": 64.0,
        }
    ]
    (gw, tr) = compare.summarize_many(rounds, {"best_sequences_per_second": 1000.0})
    assert gw["texts_per_second"] == 700.0 and (gw["texts_per_second_min"], gw["texts_per_second_max"]) == (600, 800)
    assert gw["share_of_ceiling"] == pytest.approx(0.7) and gw["p50_ms"] == 20.0 and gw["rounds"] == 3
    assert tr["share_of_ceiling"] == pytest.approx(0.5) and tr["errors"] == 1
    data = {
        "started_at": "t",
        "elapsed_seconds": 60,
        "git_sha": "x",
        "smoke": False,
        "machine": {
            "cpu_model": "cpu",
            "cpu_cores": 2,
            "usable_cores": 2,
            "memory_gib": 1,
            "platform": "p",
            "python": "3",
            "load_average_1m": 0.1,
        },
        "config": {"questions": 400, "duration_seconds": 8, "warmup_seconds": 2, "repeats": 3},
        "ceiling": None,
        "summary": [],
        "failed": [],
        "notes": [],
        "many_texts": {"texts_per_request": 32, "clients": 4, "summary": [gw, tr]},
    }
    text = compare.render_markdown(data, ".")
    assert "### 32 texts per request" in text and "| gateway-int8 | 700.0 | 600.0–800.0 | 70 % |" in text


def test_goals_are_judged_from_the_medians_of_the_run():
    def row(name, c, rps, p50, p99):
        return {"contender": name, "concurrency": c, "rps": rps, "p50_ms": p50, "p99_ms": p99}

    data = {
        "summary": [
            row("triton", 64, 400.0, 150.0, 220.0),
            row("gateway-int8", 64, 480.0, 130.0, 200.0),  # 1.2x and a lower P99: met
            row("gateway-grpc", 64, 450.0, 140.0, 230.0),  # 1.125x < 1.2x: missed
            row("triton", 1, 90.0, 6.0, 9.0),
            row("gateway-int8", 1, 120.0, 6.9, 10.0),  # +0.9 ms: met
        ],
        "ceiling": {"best_sequences_per_second": 1000.0},
        "many_texts": {
            "texts_per_request": 32,
            "summary": [{"contender": "gateway-int8", "texts_per_second": 650.0, "share_of_ceiling": 0.65}],
        },
    }
    verdicts = {g["goal"]: g["met"] for g in compare.goals(data)}
    assert verdicts == {
        "64 clients: gateway REST ≥ 1.1× Triton direct's throughput, P99 no worse": True,
        "64 clients: gateway gRPC ≥ 1.2× Triton direct's throughput, P99 no worse": False,
        "1 client: gateway REST P50 ≤ Triton direct's + 1 ms": True,
        "32 texts per request (gateway-int8): ≥ 70% of the in-process ceiling": False,
    }
