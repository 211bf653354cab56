"""Reliability under faults: Triton killed, Triton stalled, clients leaving, SIGTERM (issue 8, scenarios 1, 2, 4, 6).

Every scenario runs ``python -m service.gateway`` as a process against a real tritonserver and drives it over HTTP
from this process. Loops are bounded by count and by the clock; figures go to the reliability JSON
(tests/helpers/reliability.py) for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections import Counter

import httpx
import pytest
import tritonclient.grpc as grpcclient

from tests.helpers.gateway_process import QUESTIONS, GatewayProcess, external_gateway, metric_value
from tests.helpers.reliability import record

pytestmark = pytest.mark.integration

TRITON_PID = re.compile(r"embedded Triton ready: .*\(pid (\d+)\)")
RESTARTED = re.compile(r"embedded tritonserver restarted \(pid (\d+)\)")


def _inference_count(grpc_url: str, model: str = "classifier_int8") -> int:
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        stats = client.get_inference_statistics(model_name=model, as_json=True)["model_stats"]
    finally:
        client.close()
    return sum(int(s.get("inference_count", 0)) for s in stats)


def test_triton_killed_mid_load_fails_fast_then_recovers(model_repository, tmp_path):
    gw = GatewayProcess(
        [
            "--embedded-triton",
            "--model-repository",
            str(model_repository),
            "--triton-log",
            str(tmp_path / "triton.log"),
        ],
        {
            "GATEWAY_GRPC_PORT": "-1",
            "GATEWAY_VARIANTS": "int8",
            "GATEWAY_DRAIN_GRACE_SECONDS": "0",
            "GATEWAY_LOG_LEVEL": "info",
        },
        tmp_path / "gateway.log",
    )
    deadline_ms, clients, cap_seconds = 3000, 8, 90.0
    try:
        url = gw.wait_ready(180)
        match = TRITON_PID.search(gw.log())
        assert match, gw.log()[-3000:]
        triton_pid = int(match.group(1))
        codes: Counter[int] = Counter()
        lost = 0
        too_slow: list[float] = []
        ready_codes: list[tuple[float, int]] = []
        first_200_after_kill: float | None = None
        kill_at: float | None = None
        started = time.monotonic()

        async def client(c: httpx.AsyncClient, i: int) -> None:
            nonlocal lost, first_200_after_kill
            k = i
            while time.monotonic() - started < cap_seconds:
                if first_200_after_kill is not None and time.monotonic() > first_200_after_kill + 1.0:
                    return  # recovered and served a while: done
                t0 = time.monotonic()
                try:
                    resp = await c.post("/v1/classify", json={"text": QUESTIONS[k % 4], "deadline_ms": deadline_ms})
                except httpx.HTTPError:
                    lost += 1
                    continue
                took = time.monotonic() - t0
                codes[resp.status_code] += 1
                if took > deadline_ms / 1000 + 1.0:
                    too_slow.append(took)
                if resp.status_code == 200 and kill_at is not None and t0 > kill_at and first_200_after_kill is None:
                    first_200_after_kill = time.monotonic()
                if resp.status_code != 200:
                    await asyncio.sleep(0.02)  # a failing client backs off a little, as real ones do
                k += 1

        async def prober(c: httpx.AsyncClient) -> None:
            while time.monotonic() - started < cap_seconds and first_200_after_kill is None:
                resp = await c.get("/readyz")
                ready_codes.append((time.monotonic(), resp.status_code))
                await asyncio.sleep(0.1)

        async def killer() -> None:
            nonlocal kill_at
            await asyncio.sleep(1.5)
            kill_at = time.monotonic()
            os.kill(triton_pid, signal.SIGKILL)

        async def main() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=deadline_ms / 1000 + 10) as c:
                await asyncio.gather(*(client(c, i) for i in range(clients)), prober(c), killer())

        asyncio.run(main())
        restarted = RESTARTED.search(gw.log())
        assert restarted, gw.log()[-3000:]
        assert int(restarted.group(1)) != triton_pid
        assert kill_at is not None and first_200_after_kill is not None, (codes, gw.log()[-3000:])
        recovery = first_200_after_kill - kill_at
        not_ready = [t for t, code in ready_codes if code == 503 and t > kill_at]
        sent = sum(codes.values()) + lost
        record(
            "triton_killed",
            {
                "requests_sent": sent,
                "answered": {str(k): v for k, v in codes.items()},
                "lost": lost,
                "recovery_seconds": round(recovery, 2),
                "readyz_503_seen": bool(not_ready),
                "slowest_answer_over_deadline": len(too_slow),
                "clients": clients,
                "deadline_ms": deadline_ms,
            },
        )
        assert lost == 0
        assert set(codes) <= {200, 503}, codes
        assert codes[503] >= 1 and codes[200] >= 1
        assert not too_slow, too_slow
        assert not_ready, ready_codes[-10:]
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        assert gw.terminate(timeout_seconds=60) == 0
    finally:
        gw.stop()


def test_triton_stalled_requests_end_at_their_deadline(triton_server, model_repository, tmp_path):
    max_queue = 64
    gw = external_gateway(
        triton_server,
        model_repository,
        tmp_path,
        GATEWAY_BATCH__MAX_QUEUE_SIZE=str(max_queue),
        GATEWAY_BATCH__MAX_INFLIGHT_BATCHES="2",
    )
    deadline_ms, n = 1000, 40
    stopped = False
    try:
        url = gw.wait_ready(60)
        assert httpx.post(f"{url}/v1/classify", json={"text": QUESTIONS[0]}, timeout=30).status_code == 200
        os.kill(triton_server.pid, signal.SIGSTOP)
        stopped = True
        depths: list[float] = []

        async def one(c: httpx.AsyncClient, i: int) -> tuple[int | None, float]:
            t0 = time.monotonic()
            try:
                resp = await c.post("/v1/classify", json={"texts": [QUESTIONS[i % 4]] * 2, "deadline_ms": deadline_ms})
            except httpx.HTTPError:
                return None, time.monotonic() - t0
            return resp.status_code, time.monotonic() - t0

        async def watch_depth(c: httpx.AsyncClient) -> None:
            for _ in range(30):  # bounded: 3 s of samples
                depths.append(metric_value((await c.get("/metrics")).text, "gateway_queue_depth", variant="int8"))
                await asyncio.sleep(0.1)

        async def main() -> list[tuple[int | None, float]]:
            async with httpx.AsyncClient(base_url=url, timeout=15) as c:
                watcher = asyncio.create_task(watch_depth(c))
                # Two waves: the first fills the in-flight batches stuck in Triton, the second waits in the queue.
                first = [asyncio.create_task(one(c, i)) for i in range(n // 4)]
                await asyncio.sleep(0.3)
                results = await asyncio.gather(*first, *(one(c, i) for i in range(n // 4, n)))
                await watcher
                return results

        results = asyncio.run(main())
        after = httpx.get(f"{url}/metrics", timeout=10).text
        codes = Counter(code for code, _ in results)
        slowest = max(t for _, t in results)
        record(
            "triton_stalled",
            {
                "requests_sent": n,
                "texts_per_request": 2,
                "answered": {str(k): v for k, v in codes.items()},
                "lost": codes[None],
                "deadline_ms": deadline_ms,
                "slowest_answer_seconds": round(slowest, 2),
                "max_queue_depth_seen": max(depths),
                "max_queue_size": max_queue,
            },
        )
        assert codes[None] == 0
        assert set(codes) <= {504, 429}, codes  # 429 only if the queue filled; never a hang or a 5xx other than 504
        assert codes[504] >= 1
        assert slowest <= deadline_ms / 1000 + 1.5
        assert max(depths) <= max_queue and metric_value(after, "gateway_queue_depth", variant="int8") == 0
    finally:
        if stopped:
            os.kill(triton_server.pid, signal.SIGCONT)
        gw.stop()
    # Triton resumes: the next gateway request succeeds (the gateway was stopped; ask Triton directly).
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        assert client.is_server_ready(client_timeout=30)
    finally:
        client.close()


def test_disconnected_clients_work_never_reaches_triton(triton_server, model_repository, tmp_path):
    gw = external_gateway(
        triton_server,
        model_repository,
        tmp_path,
        GATEWAY_BATCH__MAX_WAIT_SECONDS="2.0",
        GATEWAY_BATCH__FLUSH_WHEN_IDLE="false",
    )
    n = 6
    try:
        url = gw.wait_ready(60)
        before_triton = _inference_count(triton_server.grpc_url)
        before = httpx.get(f"{url}/metrics", timeout=10).text

        async def leave(i: int) -> str:
            # A fresh connection per client, closed when it gives up, like a browser tab being closed.
            async with httpx.AsyncClient(base_url=url, timeout=0.3) as c:
                try:
                    await c.post("/v1/classify", json={"text": f"{QUESTIONS[i % 4]} {i}"})
                except httpx.TimeoutException:
                    return "gave up"
            return "answered"

        async def main() -> list[str]:
            return await asyncio.gather(*(leave(i) for i in range(n)))

        outcomes = asyncio.run(main())
        dropped = 0.0
        for _ in range(50):  # bounded: the batcher looks at the queue when the 2 s wait of the oldest is over
            text = httpx.get(f"{url}/metrics", timeout=10).text
            dropped = metric_value(text, "gateway_requests_rejected_total", reason="client_disconnect") - metric_value(
                before, "gateway_requests_rejected_total", reason="client_disconnect"
            )
            if dropped >= n:
                break
            time.sleep(0.1)
        batches = metric_value(text, "gateway_batch_size_count", variant="int8") - metric_value(
            before, "gateway_batch_size_count", variant="int8"
        )
        triton_delta = _inference_count(triton_server.grpc_url) - before_triton
        record(
            "client_disconnect",
            {
                "requests_sent": n,
                "clients_gave_up": outcomes.count("gave up"),
                "counted_client_disconnect": dropped,
                "batches_sent": batches,
                "triton_inferences": triton_delta,
                "lost": 0,
            },
        )
        assert outcomes == ["gave up"] * n
        assert dropped == n and batches == 0 and triton_delta == 0
        # The gateway is fine afterwards.
        assert httpx.post(f"{url}/v1/classify", json={"text": QUESTIONS[0]}, timeout=30).status_code == 200
    finally:
        gw.stop()


def test_sigterm_finishes_accepted_work_then_exits(triton_server, model_repository, tmp_path):
    gw = external_gateway(
        triton_server,
        model_repository,
        tmp_path,
        GATEWAY_BATCH__MAX_WAIT_SECONDS="0.5",
        GATEWAY_BATCH__FLUSH_WHEN_IDLE="false",
        GATEWAY_DRAIN_GRACE_SECONDS="1.0",
    )
    n_before, n_after = 10, 5
    try:
        url = gw.wait_ready(60)

        async def send(c: httpx.AsyncClient, i: int) -> int | str:
            try:
                resp = await c.post("/v1/classify", json={"texts": [QUESTIONS[i % 4]] * 4})
            except httpx.ConnectError:
                return "refused"
            except httpx.HTTPError as exc:
                return type(exc).__name__
            return resp.status_code

        async def main() -> tuple[list[int | str], list[int | str]]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                accepted = [asyncio.create_task(send(c, i)) for i in range(n_before)]
                for _ in range(100):  # bounded: until the texts sit in the queue (max_wait 0.5 s holds them)
                    text = (await c.get("/metrics")).text
                    if metric_value(text, "gateway_queue_depth", variant="int8") >= 4 * n_before:
                        break
                    await asyncio.sleep(0.01)
                gw.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                late = await asyncio.gather(*(send(c, i) for i in range(n_after)))
                return list(await asyncio.gather(*accepted)), list(late)

        accepted, late = asyncio.run(main())
        code = gw.proc.wait(timeout=60)
        record(
            "graceful_shutdown",
            {
                "accepted_before_sigterm": n_before,
                "answered_200": accepted.count(200),
                "sent_after_sigterm": n_after,
                "after_sigterm": dict(Counter(str(x) for x in late)),
                "lost": sum(1 for x in accepted if x != 200),
                "exit_code": code,
            },
        )
        assert accepted == [200] * n_before
        assert all(x in (503, "refused") for x in late), late
        assert code == 0
    finally:
        gw.stop()
