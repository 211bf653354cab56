"""Reliability under overload (issue 8, scenario 3): 3x capacity, every request answered 200 or 429.

Capacity is measured on this machine first (closed loop), then an open-loop generator offers three times that many
texts per second for a bounded time. Requests carry 16 texts so that the generator, which shares the 2 cores, stays
cheap while the gateway is overloaded in texts (its queue and batches count texts).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.helpers.gateway_process import QUESTIONS, external_gateway
from tests.helpers.reliability import record

pytestmark = pytest.mark.integration

TEXTS_PER_REQUEST = 16
MAX_QUEUE_TEXTS = 64


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _payload(i: int) -> dict:
    return {"texts": [f"{QUESTIONS[(i + j) % 4]} {j}" for j in range(TEXTS_PER_REQUEST)]}


async def _capacity(url: str, clients: int, seconds: float) -> float:
    """Texts per second answered 200 by a closed loop of ``clients``."""
    done = 0
    stop = time.monotonic() + seconds

    async def loop(c: httpx.AsyncClient, i: int) -> None:
        nonlocal done
        while time.monotonic() < stop:
            resp = await c.post("/v1/classify", json=_payload(i))
            assert resp.status_code == 200, resp.text
            done += TEXTS_PER_REQUEST
            i += 1

    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        await asyncio.gather(*(loop(c, i) for i in range(clients)))
    return done / seconds


async def _open_loop(url: str, rate_rps: float, seconds: float, max_outstanding: int) -> dict:
    """Send ``rate_rps`` requests per second for ``seconds`` regardless of answers; collect every outcome."""
    codes: Counter[int] = Counter()
    lost = 0
    missing_retry_after = 0
    skipped = 0
    admitted_texts = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(c: httpx.AsyncClient, i: int) -> None:
        nonlocal lost, missing_retry_after, admitted_texts
        try:
            resp = await c.post("/v1/classify", json=_payload(i))
        except httpx.HTTPError:
            lost += 1
            return
        codes[resp.status_code] += 1
        if resp.status_code == 429 and not resp.headers.get("retry-after"):
            missing_retry_after += 1
        if resp.status_code == 200:
            admitted_texts += TEXTS_PER_REQUEST

    limits = httpx.Limits(max_connections=max_outstanding, max_keepalive_connections=max_outstanding)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
        start = time.monotonic()
        total = int(rate_rps * seconds)
        for i in range(total):  # bounded by count; paced by the clock
            await asyncio.sleep(max(0.0, start + i / rate_rps - time.monotonic()))
            if len(tasks) >= max_outstanding:
                skipped += 1  # never expected: the gateway answers 429 at once instead of queueing forever
                continue
            task = asyncio.create_task(one(c, i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        offered_seconds = time.monotonic() - start
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    return {
        "sent": total - skipped,
        "skipped": skipped,
        "codes": codes,
        "lost": lost,
        "missing_retry_after": missing_retry_after,
        "admitted_texts": admitted_texts,
        "offered_seconds": offered_seconds,
        "elapsed_seconds": elapsed,
    }


def test_overload_at_three_times_capacity(triton_server, model_repository, tmp_path):
    gw = external_gateway(
        triton_server,
        model_repository,
        tmp_path,
        GATEWAY_BATCH__MAX_QUEUE_SIZE=str(MAX_QUEUE_TEXTS),
        GATEWAY_MAX_CLIENT_BATCH_SIZE="16",
    )
    try:
        url = gw.wait_ready(60)
        capacity = asyncio.run(_capacity(url, clients=4, seconds=3.0))
        rss_before = _rss_bytes(gw.proc.pid)
        rate = 3 * capacity / TEXTS_PER_REQUEST
        out = asyncio.run(_open_loop(url, rate_rps=rate, seconds=5.0, max_outstanding=256))
        rss_after = _rss_bytes(gw.proc.pid)
        admitted_rate = out["admitted_texts"] / out["elapsed_seconds"]
        record(
            "overload",
            {
                "capacity_texts_per_second": round(capacity, 1),
                "offered_texts_per_second": round(3 * capacity, 1),
                "requests_sent": out["sent"],
                "texts_per_request": TEXTS_PER_REQUEST,
                "answered": {str(k): v for k, v in out["codes"].items()},
                "lost": out["lost"],
                "admitted_texts_per_second": round(admitted_rate, 1),
                "admitted_share_of_capacity": round(admitted_rate / capacity, 2),
                "rss_growth_mib": round((rss_after - rss_before) / 2**20, 1),
                "max_queue_texts": MAX_QUEUE_TEXTS,
            },
        )
        assert out["lost"] == 0 and out["skipped"] == 0
        assert set(out["codes"]) <= {200, 429}, out["codes"]
        assert out["codes"][429] >= 1 and out["codes"][200] >= 1
        assert out["missing_retry_after"] == 0
        assert rss_after - rss_before < 100 * 2**20
        # The open-loop generator, the gateway and Triton share 2 cores here, and answering the shed requests (429)
        # costs the gateway CPU too, so admitted throughput stays below the closed-loop capacity: the bound checks it
        # does not collapse (measured 0.19-0.81 of capacity depending on how CPU-bound the gateway is and how much
        # CPU the generator takes; see docs/reliability.md), not a speed target.
        assert admitted_rate >= 0.10 * capacity, (admitted_rate, capacity)
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    finally:
        gw.stop()
