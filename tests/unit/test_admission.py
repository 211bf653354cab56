"""SLO- and deadline-aware admission, deadline-aware batch cuts, waiting out a backend outage, shadow agreement.

The service-time model and the policy are pure (plain data, an explicit clock); the batcher and the data plane run
with the real tokenizer over the fake backend, which can be slowed, failed, made unready or made wrong on demand.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import pytest

from service.gateway.backend.fake import FakeBackend
from service.gateway.batching.batcher import (
    FEEDBACK_DECREASE,
    FEEDBACK_FLOOR,
    FEEDBACK_INCREASE,
    FEEDBACK_MAX_CUT,
    FEEDBACK_WINDOW,
    RETRY_AFTER_BOUNDS,
    AdmissionPolicy,
    DynamicBatcher,
)
from service.gateway.batching.policy import BatchLimits, take_batch
from service.gateway.batching.service_time import MIN_SAMPLES, ServiceTimeModel
from service.gateway.errors import BackendUnavailable, Overloaded
from service.gateway.metrics import GatewayMetrics
from service.gateway.model import ClassifierModel
from service.gateway.repository import load_variant_model
from tests.helpers.gateway import LABELS, SHORT, make_settings, serve

# ------------------------------------------------------------------ the service-time model


def test_service_time_model_learns_intercept_and_per_token_cost():
    rng = random.Random(0)
    model = ServiceTimeModel()
    assert not model.ready
    for _ in range(300):
        rows, seq = rng.randint(1, 32), rng.randint(8, 64)
        model.observe(rows, seq, (0.004 + 3e-5 * rows * seq) * rng.uniform(0.9, 1.1))
    snap = model.snapshot()
    assert snap.ready and snap.samples == 300
    assert snap.intercept_seconds == pytest.approx(0.004, rel=0.35)
    assert snap.per_token_seconds == pytest.approx(3e-5, rel=0.1)
    assert model.predict(32, 20) == pytest.approx(0.004 + 3e-5 * 640, rel=0.1)
    assert model.predict_tokens(3, 1000) == pytest.approx(3 * snap.intercept_seconds + 1000 * snap.per_token_seconds)


def test_service_time_model_follows_a_slower_backend():
    model = ServiceTimeModel(forgetting=0.95)
    for _ in range(100):
        model.observe(16, 20, 0.01)
    fast = model.predict(16, 20)
    for _ in range(100):
        model.observe(16, 20, 0.03)  # the machine got three times slower
    assert fast == pytest.approx(0.01, rel=0.1) and model.predict(16, 20) == pytest.approx(0.03, rel=0.1)


def test_service_time_model_survives_a_long_run_of_equal_batches_and_one_stall():
    """Covariance wind-up: equal batches leave one direction unexcited; one odd sample must not swing the fit."""
    model = ServiceTimeModel()
    for i in range(1000):
        model.observe(32, 14, 0.05 + 0.005 * (i % 3))
    before_full, before_small = model.predict(32, 14), model.predict(8, 14)
    model.observe(8, 14, 0.02)
    model.observe(32, 16, 0.5)  # a stalled batch, 10x the usual
    assert model.predict(32, 14) == pytest.approx(before_full, rel=0.25)
    assert 0.0 < model.predict(8, 14) <= before_full and model.predict(8, 14) == pytest.approx(before_small, rel=0.5)


def test_service_time_model_ignores_nonsense_samples():
    model = ServiceTimeModel()
    for bad in ((0, 10, 0.01), (4, 0, 0.01), (4, 10, float("nan")), (4, 10, -1.0)):
        model.observe(*bad)
    assert model.samples == 0


# ------------------------------------------------------------------ the policy's deadline cut


@dataclass
class E:
    enqueued_at: float
    deadline: float
    length: int
    cancelled: bool = False


def test_batch_is_cut_to_the_largest_prefix_that_meets_its_earliest_deadline():
    limits = BatchLimits(max_batch_size=8, max_wait_seconds=0.0, max_batch_tokens=10_000)
    entries = [E(0.0, 10.0, 10) for _ in range(5)] + [E(0.1, 0.35, 10)] + [E(0.2, 10.0, 10) for _ in range(2)]

    def predict(rows: int, longest: int) -> float:
        return 0.05 * rows  # 50 ms per row

    plan = take_batch(entries, limits, now=0.2, predict=predict)
    # 6 rows would finish at 0.2 + 0.30 = 0.50 > 0.35 (the urgent sixth entry's deadline): cut to 5 rows... but the
    # urgent entry is the sixth, so the largest prefix meeting the earliest deadline *in it* is the first five.
    assert len(plan.batch) == 5 and all(e.deadline == 10.0 for e in plan.batch)
    assert [e.enqueued_at for e in plan.rest] == [0.1, 0.2, 0.2]  # back in arrival order
    no_cut = take_batch(entries, limits, now=0.2)
    assert len(no_cut.batch) == 8
    tight = [E(0.0, 0.21, 10) for _ in range(4)]
    assert len(take_batch(tight, limits, now=0.2, predict=predict).batch) == 1  # the first entry always goes


# ------------------------------------------------------------------ the batcher


class Harness:
    def __init__(
        self,
        repo,
        backend: FakeBackend,
        *,
        slo: float | None,
        max_batch_size: int = 8,
        max_inflight: int = 1,
        parallelism: int = 1,
    ) -> None:
        self.metrics = GatewayMetrics(version="t", git_sha="t")
        self.backend = backend
        model = load_variant_model(repo, "classifier_int8", "int8", None)
        self.model = ClassifierModel(model, backend, self.metrics, tokenize_in_thread=False)
        self.batcher = DynamicBatcher(
            "int8",
            self.model.process,
            limits=BatchLimits(max_batch_size=max_batch_size, max_wait_seconds=0.0, max_batch_tokens=100_000),
            max_queue_size=4096,
            max_inflight_batches=max_inflight,
            retry_after_seconds=1,
            metrics=self.metrics,
            admission=AdmissionPolicy(slo_seconds=slo, slo_fraction=1.0, recovery_grace_seconds=0.0),
            ready=backend.ready,
            backend_parallelism=parallelism,
        )

    def submit(self, *texts: str, deadline_in: float = 30.0):
        rows = self.model.encoder.encode(list(texts))
        return self.batcher.submit(rows, [len(r) for r in rows], time.monotonic() + deadline_in)

    def train(self, seconds_per_batch: float) -> None:
        for _ in range(MIN_SAMPLES * 4):
            self.batcher.service_time.observe(8, 10, seconds_per_batch)

    def sample(self, name: str, **labels) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def harness(repo):
    made: list[Harness] = []

    async def make(backend: FakeBackend | None = None, **kw) -> Harness:
        h = Harness(repo, backend or FakeBackend(len(LABELS)), **kw)
        await h.batcher.start()
        made.append(h)
        return h

    yield make
    for h in made:
        if h.backend.gate is not None:
            h.backend.gate.set()
        await h.batcher.stop(timeout_seconds=5.0)


async def test_untrained_model_admits_everything(harness):
    h = await harness(slo=0.001)
    results = await asyncio.wait_for(asyncio.gather(*h.submit(SHORT, SHORT)), 10)
    assert len(results) == 2  # no prediction yet: only the count bound applies


async def test_admission_refuses_what_would_miss_the_slo_with_a_computed_retry_after(harness):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    h = await harness(backend, slo=0.45)
    h.train(0.1)  # 100 ms per batch of 8 short texts
    first = h.submit(*[SHORT] * 8)  # in flight
    await backend.wait_entered(1)
    queued = [f for _ in range(3) for f in h.submit(*[SHORT] * 8)]  # 3 batches queued: ~0.4 s with the one in flight
    with pytest.raises(Overloaded) as refused:
        h.submit(*[SHORT] * 8)  # a fifth batch would finish after ~0.5 s, over the 0.45 s SLO
    assert refused.value.status == 429
    low, high = RETRY_AFTER_BOUNDS
    assert low <= int(refused.value.headers["Retry-After"]) <= high
    assert "predicted" in refused.value.message
    assert h.sample("gateway_requests_rejected_total", reason="predicted_late") == 8
    h.batcher.precheck(time.monotonic() + 30.0)  # the work ahead alone (~0.4 s) fits the SLO...
    with pytest.raises(Overloaded):
        h.batcher.precheck(time.monotonic() + 0.3)  # ...but not a 0.3 s deadline: refused before tokenizing
    gate.set()
    await asyncio.wait_for(asyncio.gather(*first, *queued), 10)
    assert h.batcher.predicted_drain_seconds() == 0.0


async def test_parallel_backend_instances_drain_the_queue_faster_but_never_split_a_batch(harness):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    h = await harness(backend, slo=0.45, max_inflight=2, parallelism=2)
    assert h.batcher.parallelism == 2
    h.train(0.1)  # 100 ms per batch of 8 short texts, on each of two instances
    idle = h.batcher.predicted_completion_seconds([5] * 8)
    assert idle == pytest.approx(h.batcher.service_time.predict(8, 5), rel=0.2)  # one batch: not halved
    running = [f for _ in range(2) for f in h.submit(*[SHORT] * 8)]  # one batch on each instance
    await backend.wait_entered(2)
    queued = [f for _ in range(4) for f in h.submit(*[SHORT] * 8)]  # 4 queued: 2 rounds of 2 instances
    drain = h.batcher.predicted_drain_seconds()
    assert 0.2 <= drain <= 0.35, drain  # (2 x ~0.1 left + 4 x 0.1) / 2 instances, not the serial 0.6 s
    h.submit(*[SHORT] * 8)  # a 7th batch: ~0.35 s on two instances fits the 0.45 s SLO (serially: 0.7 s)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*running, *queued), 10)


async def test_queue_tokens_are_priced_with_the_padding_recent_batches_had(harness):
    h = await harness(slo=10.0)
    for _ in range(32):  # 1.25 ms per padded token, no fixed cost
        h.batcher.service_time.observe(8, 10, 0.1)
        h.batcher.service_time.observe(8, 40, 0.4)
    assert h.batcher.padding_ratio == 1.0
    long_text = " ".join(["word"] * 40)
    await asyncio.wait_for(asyncio.gather(*h.submit(SHORT, SHORT, SHORT, long_text)), 10)  # one padded batch
    ratio = h.batcher.padding_ratio
    assert ratio > 1.0  # three short texts padded to the long one's length
    model = h.batcher.service_time
    # eight queued texts of 10 tokens are priced as the padded work batches of them really were
    assert h.batcher.predicted_completion_seconds([10] * 8) == pytest.approx(model.predict_tokens(1, int(80 * ratio)))
    assert model.predict_tokens(1, int(80 * ratio)) > model.predict_tokens(1, 80)


async def test_one_instance_is_assumed_when_the_gateway_keeps_fewer_batches_in_flight(harness):
    h = await harness(slo=0.45, max_inflight=1, parallelism=4)
    assert h.batcher.parallelism == 1  # instances beyond the in-flight limit never run a batch of the variant


async def test_late_answers_shrink_the_budget_and_prompt_ones_restore_it(harness):
    """AIMD on the outcome: a window with >1% of answers past the SLO shrinks the budget; comfortable ones grow it."""
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    h = await harness(backend, slo=0.45)
    h.train(0.1)
    first = h.submit(*[SHORT] * 8)
    await backend.wait_entered(1)
    queued = [f for _ in range(3) for f in h.submit(*[SHORT] * 8)]  # ~0.4 s of work ahead: fits 0.45 s
    h.batcher.precheck(time.monotonic() + 30.0)
    for i in range(FEEDBACK_WINDOW):
        h.batcher.observe_latency(0.5 if i < 2 else 0.2)  # 2% answered past the SLO, P99 0.5 s: 0.45/0.5 = 0.9
    assert h.batcher.budget_scale == pytest.approx(FEEDBACK_DECREASE)  # a small miss: the fixed step
    assert h.sample("gateway_admission_budget_scale", variant="int8") == pytest.approx(FEEDBACK_DECREASE)
    with pytest.raises(Overloaded):  # the same work ahead no longer fits the shrunk budget (0.45 x 0.8 s)
        h.batcher.precheck(time.monotonic() + 30.0)
    for _ in range(FEEDBACK_WINDOW):
        h.batcher.observe_latency(0.42)  # inside the SLO but not comfortably: no change
    assert h.batcher.budget_scale == pytest.approx(FEEDBACK_DECREASE)
    for _ in range(3 * FEEDBACK_WINDOW):
        h.batcher.observe_latency(0.1)
    assert h.batcher.budget_scale == pytest.approx(FEEDBACK_DECREASE + 3 * FEEDBACK_INCREASE)
    scale = h.batcher.budget_scale
    for i in range(FEEDBACK_WINDOW):
        h.batcher.observe_latency(0.6 if i < 5 else 0.2)  # P99 0.6 s: cut in proportion, 0.45/0.6 = 0.75
    assert h.batcher.budget_scale == pytest.approx(scale * 0.75)
    scale = h.batcher.budget_scale
    for _ in range(FEEDBACK_WINDOW):
        h.batcher.observe_latency(5.0)  # far over: at most halved in one window
    assert h.batcher.budget_scale == pytest.approx(max(FEEDBACK_FLOOR, scale * FEEDBACK_MAX_CUT))
    for _ in range(10 * FEEDBACK_WINDOW):
        h.batcher.observe_latency(5.0)
    assert h.batcher.budget_scale == pytest.approx(FEEDBACK_FLOOR)  # never below the floor
    for _ in range(40 * FEEDBACK_WINDOW):
        h.batcher.observe_latency(0.1)
    assert h.batcher.budget_scale == 1.0  # never above the configured budget
    h.batcher.precheck(time.monotonic() + 30.0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*first, *queued), 10)


async def test_an_idle_backend_admits_a_request_even_if_it_alone_exceeds_the_slo(harness):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    h = await harness(backend, slo=0.05)
    h.train(0.1)  # one batch alone takes 0.1 s: over the 0.05 s SLO
    alone = h.submit(*[SHORT] * 8)  # nothing ahead: refusing it would only send the client back to the same wait
    await backend.wait_entered(1)
    with pytest.raises(Overloaded):
        h.submit(*[SHORT] * 8)  # behind it, the SLO applies
    with pytest.raises(Overloaded):
        h.batcher.precheck(time.monotonic() + 30.0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*alone), 10)
    with pytest.raises(Overloaded):
        h.submit(*[SHORT] * 8, deadline_in=0.05)  # idle again, but its own deadline is too short


async def test_admission_refuses_what_would_miss_its_own_deadline(harness):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    h = await harness(backend, slo=None)  # deadlines only
    h.train(0.1)
    busy = h.submit(*[SHORT] * 8)
    await backend.wait_entered(1)
    with pytest.raises(Overloaded):
        h.submit(SHORT, deadline_in=0.05)  # 100 ms of work ahead, 50 ms of deadline
    late_ok = h.submit(SHORT, deadline_in=5.0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*busy, *late_ok), 10)


async def test_a_batch_waits_out_an_outage_and_is_retried_once(harness):
    backend = FakeBackend(len(LABELS), fail_with=BackendUnavailable("down"), is_ready=False)
    h = await harness(backend, slo=0.2)
    futures = h.submit(SHORT, "Where is Rome ?", deadline_in=10.0)
    await backend.wait_entered(1)
    await asyncio.sleep(0.3)
    assert not any(f.done() for f in futures) and h.batcher.outage
    backend.fail_with, backend.is_ready = None, True  # the server is back
    results = await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert len(results) == 2 and backend.entered == 2  # the first attempt and exactly one retry
    assert h.sample("gateway_backend_retries_total", variant="int8") == 1
    assert not h.batcher.outage


async def test_an_outage_longer_than_the_deadline_gives_503_in_time(harness):
    backend = FakeBackend(len(LABELS), fail_with=BackendUnavailable("down"), is_ready=False)
    h = await harness(backend, slo=0.2)
    t0 = time.monotonic()
    (future,) = h.submit(SHORT, deadline_in=0.3)
    with pytest.raises(BackendUnavailable):
        await asyncio.wait_for(future, 5)
    assert time.monotonic() - t0 < 0.3 + 0.2  # gave up before (or at) the deadline, never hung
    assert backend.entered == 1  # no retry: the server never became ready


async def test_a_second_failure_after_the_retry_is_not_retried_again(harness):
    backend = FakeBackend(len(LABELS), fail_with=BackendUnavailable("down"), is_ready=True)
    h = await harness(backend, slo=0.2)
    (future,) = h.submit(SHORT, deadline_in=5.0)
    with pytest.raises(BackendUnavailable):
        await asyncio.wait_for(future, 5)
    assert backend.entered == 2


async def test_during_an_outage_admission_checks_deadlines_not_the_slo(harness):
    backend = FakeBackend(len(LABELS), fail_with=BackendUnavailable("down"), is_ready=False)
    h = await harness(backend, slo=0.05, max_batch_size=8)
    first = h.submit(SHORT, deadline_in=10.0)  # untrained: admitted
    await backend.wait_entered(1)
    await asyncio.sleep(0.15)
    assert h.batcher.outage
    h.train(0.1)  # one batch alone is over the SLO: in normal times everything beyond it is refused
    waiting = [f for _ in range(3) for f in h.submit(*[SHORT] * 8, deadline_in=10.0)]  # admitted: deadline allows
    backend.fail_with, backend.is_ready = None, True
    await asyncio.wait_for(asyncio.gather(*first, *waiting), 10)
    with pytest.raises(Overloaded):  # healthy again: the SLO applies
        for _ in range(4):
            h.submit(*[SHORT] * 8, deadline_in=10.0)


# ------------------------------------------------------------------ shadow agreement through the app


async def _shadowed(repo, backend: FakeBackend, n: int) -> dict[str, float]:
    settings = make_settings(repo, shadow={"fraction": 1.0, "primary": "int8", "shadow": "fp16"})
    async with serve(settings, backend) as client:
        for i in range(n):
            resp = await client.post("/v1/classify", json={"texts": [f"{SHORT} {i}", "Where is Rome ?"]})
            assert resp.status_code == 200
            await asyncio.sleep(0.02)  # idle capacity: the comparison runs between requests
        dataplane = client.app.state.dataplane
        await asyncio.wait_for(dataplane._shadow_task or asyncio.sleep(0), 5)
        reg = client.app.state.runtime.metrics.registry
        labels = {"primary": "int8", "shadow": "fp16"}
        return {
            "comparisons": reg.get_sample_value("gateway_shadow_comparisons_total", labels) or 0.0,
            "agreements": reg.get_sample_value("gateway_shadow_agreements_total", labels) or 0.0,
            "diff_count": reg.get_sample_value("gateway_shadow_probability_difference_count", labels) or 0.0,
        }


async def test_shadow_agreement_is_recorded_and_drops_for_a_wrong_model(repo):
    good = await _shadowed(repo, FakeBackend(len(LABELS)), 10)
    assert good["comparisons"] >= 10 and good["agreements"] == good["comparisons"]
    assert good["diff_count"] == good["comparisons"]
    bad = await _shadowed(repo, FakeBackend(len(LABELS), rolled_models=["classifier_int8"]), 10)
    assert bad["comparisons"] >= 10 and bad["agreements"] == 0


async def test_shadow_never_runs_for_other_variants_or_when_off(repo):
    backend = FakeBackend(len(LABELS))
    async with serve(make_settings(repo, shadow={"fraction": 0.0}), backend) as client:
        for _ in range(5):
            assert (await client.post("/v1/classify", json={"text": SHORT})).status_code == 200
    assert {c.model for c in backend.calls} == {"classifier_int8"}
    backend = FakeBackend(len(LABELS))
    async with serve(make_settings(repo, shadow={"fraction": 1.0}), backend) as client:
        for _ in range(5):
            resp = await client.post("/v1/classify", json={"text": SHORT, "variant": "fp16"})
            assert resp.status_code == 200
    assert {c.model for c in backend.calls} == {"classifier_fp16"}  # fp16 is the shadow, not a primary


async def test_models_endpoint_shows_the_service_time_model(repo):
    async with serve(make_settings(repo)) as client:
        for _ in range(3):
            await client.post("/v1/classify", json={"text": SHORT})
        body = (await client.get("/v1/models")).json()
    st = body["models"][0]["service_time"]
    assert st["samples"] >= 3 and st["slo_seconds"] == pytest.approx(0.2)
    assert set(st) == {
        "intercept_seconds",
        "per_token_seconds",
        "samples",
        "ready",
        "predicted_drain_seconds",
        "backend_parallelism",
        "padding_ratio",
        "slo_seconds",
        "budget_scale",
    }
    assert st["backend_parallelism"] == 1  # the fake backend reports one instance
    assert st["padding_ratio"] == 1.0  # one text per batch: no padding
    assert st["budget_scale"] == 1.0
