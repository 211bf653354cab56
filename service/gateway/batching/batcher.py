"""The dynamic batcher of one variant: waits, forms batches by the policy, calls the backend, fans results out.

One background task per variant forms batches; each batch then runs as its own task, at most
``max_inflight_batches`` at a time, so the next batch forms while one is in flight (TEI runs two batching tasks for
the same reason). A slot is acquired *before* a batch is taken: while every slot is busy, entries keep
accumulating and the next batch is as large as the limits allow, the way Triton's batcher waits for a free model
instance.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.gateway.backend.base import InferenceBackend
from service.gateway.batching.policy import BatchLimits, flush_delay, take_batch
from service.gateway.batching.queue import Entry, RequestQueue
from service.gateway.errors import BackendUnavailable, DeadlineExceeded, Internal, ServiceError
from service.gateway.metrics import GatewayMetrics
from service.gateway.repository import BatchEncoder, VariantModel

logger = logging.getLogger("service.gateway.batching")


@dataclass(frozen=True)
class TextResult:
    """The answer for one text.

    Attributes:
        label: The most probable class.
        score: Its probability.
        probabilities: Class -> probability, for every class.
        model_version: The model version that answered.
        queue_seconds: Time the text waited in the queue.
        inference_seconds: Time its batch spent in tokenization and the backend call.
    """

    label: str
    score: float
    probabilities: dict[str, float]
    model_version: str
    queue_seconds: float
    inference_seconds: float


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stable probabilities.

    Args:
        logits: [rows, classes].

    Returns:
        Probabilities of the same shape, each row summing to 1.
    """
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class DynamicBatcher:
    """Batches the texts of one variant into backend calls.

    Args:
        model: The variant's model (name, version, labels).
        encoder: Tokenizer of that model version.
        backend: Where batches go.
        limits: Batch limits.
        max_queue_size: Queue bound.
        max_inflight_batches: Most concurrent backend calls of this variant.
        retry_after_seconds: Retry-After of queue-full rejections.
        metrics: Metric objects.
        tokenize_in_thread: Tokenize batches in a worker thread instead of on the event loop.
        flush_when_idle: Send at once when no batch is in flight (no wait for companions on an idle backend).
    """

    def __init__(
        self,
        model: VariantModel,
        encoder: BatchEncoder,
        backend: InferenceBackend,
        *,
        limits: BatchLimits,
        max_queue_size: int,
        max_inflight_batches: int,
        retry_after_seconds: int,
        metrics: GatewayMetrics,
        tokenize_in_thread: bool = True,
        flush_when_idle: bool = False,
    ) -> None:
        if max_inflight_batches < 1:
            raise ValueError(f"max_inflight_batches must be >= 1, got {max_inflight_batches}")
        self.model = model
        self.encoder = encoder
        self.limits = limits
        self._flush_when_idle = flush_when_idle
        # With nothing in flight the backend is idle and waiting for companions only adds latency.
        self._idle_limits = dataclasses.replace(limits, max_wait_seconds=0.0)
        self._backend = backend
        self._metrics = metrics
        self._tokenize_in_thread = tokenize_in_thread
        self._max_inflight = max_inflight_batches
        variant = model.variant
        self._queue = RequestQueue(
            max_queue_size,
            retry_after_seconds=retry_after_seconds,
            on_depth=metrics.queue_depth.labels(variant=variant).set,
        )
        self._slots: asyncio.Semaphore | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._accepting = False
        self._draining = False
        self._stopped = False
        self._queue_wait = metrics.queue_wait_seconds.labels(variant=variant)
        self._batch_size = metrics.batch_size.labels(variant=variant)
        self._seq_len = metrics.batch_sequence_length.labels(variant=variant)
        self._tokenize_time = metrics.tokenize_duration_seconds.labels(variant=variant)
        self._backend_time = metrics.backend_request_duration_seconds.labels(model=model.model_name)
        self._inflight = metrics.inflight_batches.labels(variant=variant)

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        """Whether the batching task is alive and admitting work."""
        return self._accepting and self._loop_task is not None and not self._loop_task.done()

    @property
    def queue_depth(self) -> int:
        """Texts waiting."""
        return len(self._queue)

    @property
    def inflight(self) -> int:
        """Batches in flight."""
        return len(self._batch_tasks)

    async def start(self) -> None:
        """Start the batching task (inside the running event loop)."""
        if self._loop_task is not None:
            raise RuntimeError(f"batcher {self.model.variant} already started")
        self._slots = asyncio.Semaphore(self._max_inflight)
        self._accepting = True
        self._loop_task = asyncio.create_task(self._run(), name=f"batcher-{self.model.variant}")

    async def stop(self, timeout_seconds: float) -> None:
        """Stop admitting, finish what was accepted, then stop.

        Queued entries are still batched and sent (without waiting for companions). Whatever is not answered after
        ``timeout_seconds`` fails with BackendUnavailable, so no accepted request is silently lost.

        Args:
            timeout_seconds: Longest time to spend draining.
        """
        self._accepting = False
        self._draining = True
        self._queue.wake()
        if self._loop_task is None or self._stopped:
            return
        self._stopped = True
        give_up = time.monotonic() + timeout_seconds
        try:
            await asyncio.wait_for(asyncio.shield(self._loop_task), timeout_seconds)
        except asyncio.TimeoutError:
            pass
        pending = set(self._batch_tasks)
        left = give_up - time.monotonic()
        if pending and left > 0:
            await asyncio.wait(pending, timeout=left)
        if not self._loop_task.done():
            self._loop_task.cancel()
        for task in list(self._batch_tasks):
            task.cancel()  # _process fails the batch's futures on cancellation
        await asyncio.gather(self._loop_task, *self._batch_tasks, return_exceptions=True)
        leftovers = self._queue.snapshot()
        self._queue.replace([])
        shutdown = BackendUnavailable("gateway shut down before the request was processed")
        self._fail(leftovers, shutdown, reason="shutdown")

    # ---------------------------------------------------------------- admission

    def submit(self, texts: Sequence[str], deadline: float) -> list[asyncio.Future[TextResult]]:
        """Queue the texts of one request, all or none.

        Args:
            texts: The texts (each becomes one batch row).
            deadline: Monotonic time after which the texts are dropped with DeadlineExceeded.

        Returns:
            One future per text, in order.

        Raises:
            BackendUnavailable: The batcher is not running (starting up or draining).
            Overloaded: The queue has no room for all texts.
        """
        if not self.running:
            raise BackendUnavailable(f"variant {self.model.variant} is not accepting requests (draining or stopped)")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        entries = [
            Entry(
                text=t,
                length=self.encoder.estimate_tokens(t),
                future=loop.create_future(),
                enqueued_at=now,
                deadline=deadline,
            )
            for t in texts
        ]
        try:
            self._queue.put_many(entries, purge=self._purge_dead)
        except ServiceError:
            self._metrics.requests_rejected_total.labels(reason="queue_full").inc(len(entries))
            raise
        return [e.future for e in entries]

    def _purge_dead(self) -> None:
        plan = take_batch(self._queue.snapshot(), self.limits, time.monotonic())
        # Only dead entries leave; the live ones (batch and rest) stay queued in their original order.
        if plan.expired or plan.cancelled:
            dead = {id(e) for e in plan.expired} | {id(e) for e in plan.cancelled}
            self._queue.replace(e for e in self._queue.snapshot() if id(e) not in dead)
            self._drop(plan.expired, plan.cancelled)

    # ---------------------------------------------------------------- the loop

    def _current_limits(self) -> BatchLimits:
        if self._flush_when_idle and not self._batch_tasks:
            return self._idle_limits
        return self.limits

    async def _wait_until_due(self) -> None:
        while not self._draining:
            self._queue.clear_changed()
            delay = flush_delay(self._queue.snapshot(), self._current_limits(), time.monotonic())
            if delay is not None and delay <= 0:
                return
            await self._queue.wait_changed(delay)

    async def _run(self) -> None:
        assert self._slots is not None
        while True:
            await self._wait_until_due()
            if self._draining and len(self._queue) == 0:
                return
            await self._slots.acquire()
            now = time.monotonic()
            plan = take_batch(self._queue.snapshot(), self._current_limits(), now)
            self._queue.replace(plan.rest)
            self._drop(plan.expired, plan.cancelled)
            if not plan.batch:
                self._slots.release()
                continue
            for e in plan.batch:
                e.taken_at = now
                self._queue_wait.observe(now - e.enqueued_at)
            task = asyncio.create_task(self._process(plan.batch), name=f"batch-{self.model.variant}")
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batch_tasks.discard(task)
        assert self._slots is not None
        self._slots.release()
        if self._flush_when_idle and not self._batch_tasks:
            self._queue.wake()  # the backend just went idle: texts waiting for companions can go now

    async def _process(self, batch: list[Entry]) -> None:
        model = self.model
        self._batch_size.observe(len(batch))
        self._inflight.inc()
        started = time.perf_counter()
        try:
            texts = [e.text for e in batch]
            t0 = time.perf_counter()
            if self._tokenize_in_thread:
                input_ids, attention_mask = await asyncio.to_thread(self.encoder.encode, texts)
            else:
                input_ids, attention_mask = self.encoder.encode(texts)
            self._tokenize_time.observe(time.perf_counter() - t0)
            self._seq_len.observe(input_ids.shape[1])
            t1 = time.perf_counter()
            # Nobody waits for this batch after its latest deadline: end the call then (cancelling a gRPC call
            # cancels it at Triton too), so a stalled backend frees the in-flight slot instead of holding it for the
            # whole client_timeout while the queue behind it only expires.
            left = max(e.deadline for e in batch) - time.monotonic()
            try:
                out = await asyncio.wait_for(
                    self._backend.infer(model.model_name, model.version, input_ids, attention_mask), max(0.0, left)
                )
            except asyncio.TimeoutError:
                raise DeadlineExceeded("deadline passed while the inference server was computing") from None
            finally:
                self._backend_time.observe(time.perf_counter() - t1)
            if out.logits.ndim != 2 or out.logits.shape[0] != len(batch) or out.logits.shape[1] != len(model.labels):
                logger.error(
                    "%s returned logits of shape %s for %d texts and %d labels",
                    model.model_name,
                    tuple(out.logits.shape),
                    len(batch),
                    len(model.labels),
                )
                raise Internal("the inference backend returned a malformed result")
            probs = softmax(out.logits)
            elapsed = time.perf_counter() - started
            for e, row in zip(batch, probs):
                if e.future.done():  # the client went away or its deadline fired meanwhile
                    continue
                best = int(row.argmax())
                e.future.set_result(
                    TextResult(
                        label=model.labels[best],
                        score=float(row[best]),
                        probabilities={lbl: float(p) for lbl, p in zip(model.labels, row)},
                        model_version=out.model_version,
                        queue_seconds=(e.taken_at or e.enqueued_at) - e.enqueued_at,
                        inference_seconds=elapsed,
                    )
                )
        except ServiceError as exc:
            # One failed call fails every text of the batch with the same error (Ray, TEI).
            self._metrics.backend_errors_total.labels(model=model.model_name, status=exc.error_type).inc()
            self._fail(batch, exc)
        except asyncio.CancelledError:
            self._fail(batch, BackendUnavailable("gateway shut down while the request was being processed"))
            raise
        except Exception:
            # Unknown failures are bugs: the traceback goes to the log, the clients get a generic error.
            logger.exception("batch of %d for %s failed unexpectedly", len(batch), model.model_name)
            self._metrics.backend_errors_total.labels(model=model.model_name, status=Internal.error_type).inc()
            self._fail(batch, Internal("internal server error"))
        finally:
            self._inflight.dec()

    # ---------------------------------------------------------------- dropping

    def _drop(self, expired: Sequence[Entry], cancelled: Sequence[Entry]) -> None:
        if expired:
            self._metrics.requests_rejected_total.labels(reason="deadline").inc(len(expired))
            self._fail(expired, DeadlineExceeded("deadline passed while the request was queued"))
        if cancelled:
            self._metrics.requests_rejected_total.labels(reason="client_disconnect").inc(len(cancelled))

    def _fail(self, entries: Sequence[Entry], exc: ServiceError, *, reason: str | None = None) -> None:
        if reason is not None and entries:
            self._metrics.requests_rejected_total.labels(reason=reason).inc(len(entries))
        for e in entries:
            if not e.future.done():
                e.future.set_exception(exc)
