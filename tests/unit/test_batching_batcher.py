"""The dynamic batcher, driving the classifier's model adapter over the fake backend with the real tokenizer:
flush rules, drops, fan-out, limits, drain."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.gateway.backend.fake import FakeBackend, write_fake_repository
from service.gateway.batching.batcher import DynamicBatcher
from service.gateway.batching.policy import BatchLimits
from service.gateway.errors import BackendError, BackendUnavailable, DeadlineExceeded, Internal, Overloaded
from service.gateway.metrics import GatewayMetrics
from service.gateway.model import ClassifierModel
from service.gateway.repository import VariantModel, load_variant_model
from tests.helpers.gateway import LABELS, LONG, SHORT, base_tokenizer_json


@pytest.fixture
def variant_model(tmp_path) -> VariantModel:
    repo = write_fake_repository(tmp_path / "repo", base_tokenizer_json(), labels=LABELS, variants=("int8",))
    return load_variant_model(repo, "classifier_int8", "int8", None)


class Harness:
    def __init__(self, model: VariantModel, backend: FakeBackend, **kw):
        self.metrics = GatewayMetrics(version="test", git_sha="test")
        limits = BatchLimits(
            max_batch_size=kw.pop("max_batch_size", 8),
            max_wait_seconds=kw.pop("max_wait_seconds", 0.0),
            max_batch_tokens=kw.pop("max_batch_tokens", 100_000),
            length_bucket_edges=kw.pop("length_bucket_edges", (16, 32, 64)),
        )
        self.backend = backend
        self.model = ClassifierModel(model, backend, self.metrics, tokenize_in_thread=False)
        self.batcher = DynamicBatcher(
            model.variant,
            self.model.process,
            limits=limits,
            max_queue_size=kw.pop("max_queue_size", 64),
            max_inflight_batches=kw.pop("max_inflight_batches", 2),
            retry_after_seconds=3,
            metrics=self.metrics,
            flush_when_idle=kw.pop("flush_when_idle", False),
        )
        assert not kw, kw

    def sample(self, name: str, **labels) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def submit(self, *texts: str, deadline_in: float = 30.0):
        # What the data plane does at admission: exact tokenization, then all-or-nothing queueing.
        rows = self.model.encoder.encode(list(texts))
        return self.batcher.submit(rows, [len(r) for r in rows], time.monotonic() + deadline_in)


@pytest.fixture
async def make(variant_model):
    made: list[Harness] = []

    async def _make(backend: FakeBackend | None = None, **kw) -> Harness:
        h = Harness(variant_model, backend or FakeBackend(len(LABELS)), **kw)
        await h.batcher.start()
        made.append(h)
        return h

    yield _make
    for h in made:
        if h.backend.gate is not None:
            h.backend.gate.set()
        await h.batcher.stop(timeout_seconds=5.0)


async def test_size_flush_sends_one_full_batch_without_waiting(make):
    h = await make(max_batch_size=4, max_wait_seconds=30.0)
    futures = [f for t in ("a b", "c d", "e f", "g h") for f in h.submit(t)]
    results = await asyncio.wait_for(asyncio.gather(*futures), 10)  # far less than the 30 s wait
    assert [c.rows for c in h.backend.calls] == [4]
    assert all(r.value.probabilities.shape == (len(LABELS),) for r in results)
    assert all(abs(r.value.probabilities.sum() - 1.0) < 1e-9 for r in results)
    assert h.sample("gateway_batch_size_count", variant="int8") == 1
    assert h.sample("gateway_batch_size_sum", variant="int8") == 4


async def test_wait_flush_holds_a_partial_batch_until_max_wait(make):
    h = await make(max_batch_size=8, max_wait_seconds=0.5)
    futures = h.submit("first text") + h.submit("second text")
    done, _ = await asyncio.wait(futures, timeout=0.05)
    assert not done and h.backend.calls == []  # not flushed yet: 2 < 8 and the oldest waited < 0.5 s
    await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert [c.rows for c in h.backend.calls] == [2]


async def test_flush_when_idle_sends_a_lone_text_at_once_and_waits_while_busy(make):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    h = await make(backend, max_batch_size=8, max_wait_seconds=5.0, flush_when_idle=True)
    first = h.submit("alone on an idle backend")
    await backend.wait_entered(1)  # sent without waiting 5 s for companions
    # Now a batch is in flight: the next texts wait for companions (up to max_wait) instead of going one by one.
    second = h.submit("second") + h.submit("third")
    done, _ = await asyncio.wait(second, timeout=0.1)
    assert not done and [c.rows for c in backend.calls] == [1]
    gate.set()  # the first batch finishes: the backend is idle again, so the waiting texts go at once
    await asyncio.wait_for(asyncio.gather(*first, *second), 2.0)
    assert [c.rows for c in backend.calls] == [1, 2]


async def test_a_request_of_many_texts_is_split_at_max_batch_size(make):
    h = await make(max_batch_size=4, max_wait_seconds=0.0, max_inflight_batches=1)
    texts = [f"question number {i}" for i in range(10)]
    results = await asyncio.wait_for(asyncio.gather(*h.submit(*texts)), 10)
    assert [c.rows for c in h.backend.calls] == [4, 4, 2]
    # Order is kept: every text gets the answer it gets alone.
    alone = [await asyncio.wait_for(h.submit(t)[0], 10) for t in texts[:3]]
    assert [r.value.probabilities.tolist() for r in results[:3]] == [r.value.probabilities.tolist() for r in alone]


async def test_deadline_passed_in_queue_is_dropped_not_sent(make):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    h = await make(backend, max_inflight_batches=1)
    first = h.submit("keeps the only slot busy")
    await backend.wait_entered(1)
    late = h.submit("will expire", deadline_in=0.05)
    await asyncio.sleep(0.1)  # let the deadline pass while the slot is busy
    gate.set()
    await asyncio.wait_for(asyncio.gather(*first), 10)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(late[0], 10)
    assert len(backend.calls) == 1  # the expired text never reached the backend
    assert h.sample("gateway_requests_rejected_total", reason="deadline") == 1


async def test_cancelled_entry_is_dropped_and_counted(make):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    h = await make(backend, max_inflight_batches=1)
    first = h.submit("keeps the only slot busy")
    await backend.wait_entered(1)
    gone = h.submit("client went away")
    kept = h.submit("client still here")
    gone[0].cancel()
    gate.set()
    await asyncio.wait_for(asyncio.gather(*first, *kept), 10)
    assert [c.rows for c in backend.calls] == [1, 1]  # the second batch holds only the live text
    assert h.sample("gateway_requests_rejected_total", reason="client_disconnect") == 1


async def test_backend_failure_fails_every_entry_with_the_same_error(make):
    boom = BackendError("inference server failed")
    h = await make(FakeBackend(len(LABELS), fail_with=boom), max_batch_size=8)
    futures = h.submit("one", "two", "three")
    outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
    assert len(h.backend.calls) == 1
    assert all(o is boom for o in outcomes)
    assert h.sample("gateway_backend_errors_total", model="classifier_int8", status="backend_error") == 1


async def test_unexpected_exception_becomes_generic_internal(make):
    h = await make(FakeBackend(len(LABELS), fail_with=RuntimeError("secret detail")))
    outcomes = await asyncio.wait_for(asyncio.gather(*h.submit("a", "b"), return_exceptions=True), 10)
    assert all(isinstance(o, Internal) for o in outcomes)
    assert all("secret" not in o.message for o in outcomes)


@pytest.mark.parametrize("row_delta", [-1, 1])
async def test_result_count_mismatch_fails_the_whole_batch(make, row_delta):
    h = await make(FakeBackend(len(LABELS), row_delta=row_delta))
    outcomes = await asyncio.wait_for(asyncio.gather(*h.submit("a", "b", "c"), return_exceptions=True), 10)
    assert len(outcomes) == 3 and all(isinstance(o, Internal) for o in outcomes)


async def test_queue_full_rejects_at_once_and_all_or_nothing(make):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    h = await make(backend, max_inflight_batches=1, max_queue_size=2)
    busy = h.submit("in flight")
    await backend.wait_entered(1)
    queued = h.submit("q1", "q2")  # fills the queue
    with pytest.raises(Overloaded) as info:
        h.submit("one too many")
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "3"
    assert h.batcher.queue_depth == 2
    assert h.sample("gateway_requests_rejected_total", reason="queue_full") == 1
    assert h.sample("gateway_queue_depth", variant="int8") == 2
    gate.set()
    await asyncio.wait_for(asyncio.gather(*busy, *queued), 10)
    with pytest.raises(Overloaded):
        h.submit("a", "b", "c")  # 3 texts never fit a queue of 2, even when empty
    assert h.batcher.queue_depth == 0


async def test_cancelled_entries_free_queue_room(make):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    h = await make(backend, max_inflight_batches=1, max_queue_size=2)
    h.submit("in flight")
    await backend.wait_entered(1)
    queued = h.submit("q1", "q2")
    for f in queued:
        f.cancel()
    admitted = h.submit("fits: cancelled entries hold no room")
    assert h.sample("gateway_requests_rejected_total", reason="client_disconnect") == 0  # only the loop purges
    gate.set()
    await asyncio.wait_for(admitted[0], 10)
    assert h.sample("gateway_requests_rejected_total", reason="client_disconnect") == 2
    assert [c.rows for c in backend.calls] == [1, 1]  # the cancelled texts never reached the backend


async def test_expired_entries_free_queue_room(make):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    h = await make(backend, max_inflight_batches=1, max_queue_size=2)
    h.submit("in flight")
    await backend.wait_entered(1)
    h.submit("q1", "q2", deadline_in=0.02)
    await asyncio.sleep(0.05)
    admitted = h.submit("fits: expired entries hold no room")
    gate.set()
    await asyncio.wait_for(admitted[0], 10)
    assert h.sample("gateway_requests_rejected_total", reason="deadline") == 2


async def test_inflight_batches_are_bounded(make):
    backend = FakeBackend(len(LABELS))
    gate = backend.hold()
    h = await make(backend, max_batch_size=1, max_inflight_batches=2)
    futures = [f for i in range(5) for f in h.submit(f"text {i}")]
    await backend.wait_entered(2)
    await asyncio.sleep(0.05)  # give a third call every chance to start
    assert backend.entered == 2 and h.batcher.inflight == 2
    assert h.sample("gateway_inflight_batches", variant="int8") == 2
    gate.set()
    await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert backend.entered == 5


async def test_mixed_lengths_are_batched_apart(make):
    h = await make(max_batch_size=16, max_wait_seconds=0.05)
    futures = h.submit(SHORT, LONG, SHORT + " now", LONG + " again", "When ?")
    await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert len(h.backend.calls) == 2
    short_call, long_call = sorted(h.backend.calls, key=lambda c: c.seq_len)
    assert short_call.rows == 3 and long_call.rows == 2
    assert short_call.seq_len < 16 < long_call.seq_len  # short texts were not padded to the long ones


async def test_stop_drains_accepted_work_then_refuses(make):
    h = await make(max_batch_size=8, max_wait_seconds=30.0)
    futures = h.submit("queued before stop", "another one")
    await h.batcher.stop(timeout_seconds=5.0)
    results = [f.result() for f in futures]  # answered, not failed: the wait is skipped when draining
    assert len(results) == 2 and len(h.backend.calls) == 1
    with pytest.raises(BackendUnavailable):
        h.submit("after stop")


async def test_stop_timeout_fails_what_is_left(make):
    backend = FakeBackend(len(LABELS))
    backend.hold()  # never released before stop
    h = await make(backend, max_inflight_batches=1)
    inflight = h.submit("stuck in the backend")
    await backend.wait_entered(1)
    queued = h.submit("stuck in the queue")
    await h.batcher.stop(timeout_seconds=0.1)
    for f in inflight + queued:
        assert isinstance(f.exception(), BackendUnavailable)
    assert h.sample("gateway_requests_rejected_total", reason="shutdown") == 1
