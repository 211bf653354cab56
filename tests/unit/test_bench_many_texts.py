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
