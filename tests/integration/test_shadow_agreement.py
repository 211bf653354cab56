"""Shadow agreement catches a bad quantized model in a real Prometheus.

Two gateways, each with its own tritonserver: one serves the real build, the other the same build with its INT8
classifier's per-channel weight scales deliberately distorted. Both shadow every INT8 request with FP16 (on idle
capacity). One real Prometheus scrapes both (as two namespaces) with the deploy/ rules, whose windows are shortened
so the test runs in seconds (the promtool unit test checks the real 10 min / 5 min timing). Asserted: the shadow
alert fires for the corrupted build only, and the real build's recorded agreement is high.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from service.triton.launcher import TritonLaunchConfig, TritonServer
from tests.helpers.gateway_process import GatewayProcess
from tests.helpers.prometheus import QUESTIONS, RULES_DIR, PrometheusProcess, prometheus_binary
from tests.helpers.reliability import record

pytestmark = pytest.mark.integration

#: The real build's agreement with FP16 on these questions (fraction of texts with the same label): a trained model
#: (the default build, given as LORASERVE_TEST_MODEL_REPOSITORY) must reach the issue's 0.99; the tests' near-random
#: tiny build reaches 0.93 on AVX2-only CPUs (7-bit INT8 weights; 1.0 with AVX-512 VNNI kernels).
MIN_REAL_AGREEMENT = {"trained": 0.99, "tiny": 0.88}
#: The alert threshold in the test's copy of the rules (deployed: 0.97; see _rules): between the tiny build
#: (>= 0.93 measured) and its corrupted copy (0.70-0.80 measured).
TEST_AGREEMENT_THRESHOLD = 0.85


def corrupt_int8(version_dir: Path) -> None:
    """Distort the INT8 classifier's per-channel weight scales (a broken calibration, in effect)."""
    import onnx
    from onnx import numpy_helper

    path = version_dir / "model.onnx"
    model = onnx.load(str(path))
    scales = [i for i in model.graph.initializer if "classifier" in i.name and i.name.endswith("_scale")]
    assert scales, "no INT8 classifier scale in the model"
    for init in scales:
        values = numpy_helper.to_array(init).astype(np.float32)
        factors = np.array([8.0, 0.1, 4.0, 0.2, 6.0, 0.05, 3.0, 0.3][: values.size], dtype=np.float32)
        factors = np.resize(factors, values.shape)
        init.CopyFrom(numpy_helper.from_array(values * factors, init.name))
    onnx.save(model, str(path))


def _rules(workdir: Path) -> list[str]:
    """The deploy rules with their windows shortened for a test that runs in seconds."""
    out = []
    for name in ("recording-rules.yml", "alert-rules.yml"):
        text = (RULES_DIR / name).read_text().replace("[10m]", "[30s]").replace("for: 5m", "for: 0s")
        text = text.replace("> 0.1", "> 0.01")
        # The tests' tiny build (12 training steps, near-random) has top-2 logit margins down to 0.05 on these
        # questions, under its INT8 noise: on an AVX2-only CPU one or two of the 10 questions flip and its INT8
        # agrees 93-97% with FP16 (100% with AVX-512 VNNI kernels), the corrupted build 70-80%. The deployed 97% fits a
        # trained model (the default build: agreement recorded below when it is the test repository); for the
        # tiny one the test moves the threshold between the two populations. promtool's unit test
        # (tests/unit/test_prometheus_rules.py) checks the rule as deployed.
        text = text.replace("ratio_rate10m < 0.97", f"ratio_rate10m < {TEST_AGREEMENT_THRESHOLD}")
        path = workdir / name
        path.write_text(text)
        yaml.safe_load(text)
        out.append(str(path))
    return out


async def _traffic(url: str, seconds: float) -> int:
    """One client at a time with pauses: the backend is idle between requests, so every request is shadowed."""
    ok = 0
    give_up = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        i = 0
        while time.monotonic() < give_up:
            texts = [QUESTIONS[(i + j) % len(QUESTIONS)] for j in range(3)]
            resp = await c.post("/v1/classify", json={"texts": texts, "variant": "int8"})
            ok += resp.status_code == 200
            i += 1
            await asyncio.sleep(0.05)
    return ok


def test_shadow_alert_fires_for_a_corrupted_int8_model_only(model_repository, tmp_path):
    corrupted = tmp_path / "corrupted"
    shutil.copytree(model_repository, corrupted)
    (int8_dir,) = [d for d in (corrupted / "classifier_int8").iterdir() if d.name.isdigit()]
    corrupt_int8(int8_dir)
    servers, gateways = [], []
    workdir = tmp_path / "prom"
    workdir.mkdir()
    prom = None
    try:
        targets = {}
        for name, repo in (("real", model_repository), ("corrupt", corrupted)):
            server = TritonServer(TritonLaunchConfig(model_repository=repo, log_path=tmp_path / f"triton-{name}.log"))
            server.start()
            servers.append(server)
            gw = GatewayProcess(
                [],
                {
                    "GATEWAY_TRITON__GRPC_URL": server.grpc_url,
                    "GATEWAY_TRITON__MODEL_REPOSITORY": str(repo),
                    "GATEWAY_GRPC_PORT": "-1",
                    "GATEWAY_SHADOW__FRACTION": "1.0",
                    "GATEWAY_DRAIN_GRACE_SECONDS": "0",
                    "GATEWAY_LOG_LEVEL": "warning",
                },
                tmp_path / f"gateway-{name}.log",
            )
            gateways.append(gw)
            targets[name] = gw.wait_ready(90)
        prom = PrometheusProcess(
            prometheus_binary(),
            workdir,
            {name: url.removeprefix("http://") for name, url in targets.items()},
            rule_files=_rules(workdir),
            target_labels={name: {"namespace": name, "pod": f"{name}-0"} for name in targets},
        )
        prom.wait_ready(30)

        async def both() -> list[int]:
            return await asyncio.gather(*(_traffic(url, 25.0) for url in targets.values()))

        assert all(n >= 20 for n in asyncio.run(both()))
        ratio = "namespace_primary_shadow:gateway_shadow_agreements:ratio_rate10m"
        real = float(prom.wait_for(f'{ratio}{{namespace="real"}}', 30)[0]["value"][1])
        bad = float(prom.wait_for(f'{ratio}{{namespace="corrupt"}}', 30)[0]["value"][1])
        firing = prom.wait_for('ALERTS{alertname="LoraserveShadowAgreementLow",alertstate="firing"}', 40)
        namespaces = {a["metric"]["namespace"] for a in firing}
        record(
            "shadow_agreement",
            {
                "real_agreement": round(real, 4),
                "corrupted_agreement": round(bad, 4),
                "model": "the tests' tiny build" if "tiny-build" in str(model_repository) else str(model_repository),
                "test_alert_threshold": TEST_AGREEMENT_THRESHOLD,
            },
        )
        assert namespaces == {"corrupt"}, firing
        kind = "tiny" if "tiny-build" in str(model_repository) else "trained"
        assert real >= MIN_REAL_AGREEMENT[kind] and bad < TEST_AGREEMENT_THRESHOLD, (real, bad)
    finally:
        if prom is not None:
            prom.stop()
        for gw in gateways:
            gw.stop()
        for server in servers:
            server.stop()
