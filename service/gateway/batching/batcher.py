"""The dynamic batcher of one variant: waits, forms batches by the policy, calls ``process``, fans results out.

It knows nothing of the model (Ray Serve's ``@serve.batch`` shape): entries carry an opaque item and its exact
token count, and an async ``process(items) -> results`` supplied by the model adapter does the work of one batch
(:class:`service.gateway.model.ClassifierModel` pads, calls Triton and turns logits into probabilities).

One background task per variant forms batches; each batch then runs as its own task, at most
``max_inflight_batches`` at a time, so the next batch forms while one is in flight (TEI runs two batching tasks for
the same reason). A slot is acquired *before* a batch is taken: while every slot is busy, entries keep
accumulating and the next batch is as large as the limits allow, the way Triton's batcher waits for a free model
instance. Only the loop task removes entries from the queue, dead ones included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from service.gateway.batching.policy import BatchLimits, flush_delay, take_batch
from service.gateway.batching.queue import Entry, RequestQueue
from service.gateway.errors import BackendUnavailable, DeadlineExceeded, Internal, ServiceError
from service.gateway.metrics import GatewayMetrics

logger = logging.getLogger("service.gateway.batching")

R = TypeVar("R")

#: The work of one batch: the entries' items in, one result per item out (same order), within ``timeout_seconds``.
ProcessFn = Callable[[list[Any], float], Awaitable[Sequence[R]]]


@dataclass(frozen=True)
class Answered(Generic[R]):
    """What one entry's future resolves to.

    Attributes:
        value: The model adapter's result for the item.
        queue_seconds: Time the entry waited in the queue.
        inference_seconds: Time its batch spent in ``process``.
    """

    value: R
    queue_seconds: float
    inference_seconds: float


class DynamicBatcher(Generic[R]):
    """Batches the items of one variant into ``process`` calls.

    Args:
        name: The variant (metric label, task names, messages).
        process: The model adapter's batch function; it receives the items and the seconds until the latest
            deadline in the batch, and returns one result per item. It raises only ServiceError subclasses for
            expected failures; anything else is treated as a bug (logged, generic 500).
        limits: Batch limits.
        max_queue_size: Queue bound (entries).
        max_inflight_batches: Most concurrent ``process`` calls of this variant.
        retry_after_seconds: Retry-After of queue-full rejections.
        metrics: Metric objects.
        flush_when_idle: Send at once when no batch is in flight (no wait for companions on an idle backend).
    """

    def __init__(
        self,
        name: str,
        process: ProcessFn[R],
        *,
        limits: BatchLimits,
        max_queue_size: int,
        max_inflight_batches: int,
        retry_after_seconds: int,
        metrics: GatewayMetrics,
        flush_when_idle: bool = False,
    ) -> None:
        if max_inflight_batches < 1:
            raise ValueError(f"max_inflight_batches must be >= 1, got {max_inflight_batches}")
        self.name = name
        self.limits = limits
        self._process_fn = process
        self._flush_when_idle = flush_when_idle
        # With nothing in flight the backend is idle and waiting for companions only adds latency.
        self._idle_limits = dataclasses.replace(limits, max_wait_seconds=0.0)
        self._metrics = metrics
        self._max_inflight = max_inflight_batches
        self._queue = RequestQueue(
            max_queue_size,
            retry_after_seconds=retry_after_seconds,
            on_depth=metrics.queue_depth.labels(variant=name).set,
        )
        self._slots: asyncio.Semaphore | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._accepting = False
        self._draining = False
        self._stopped = False
        self._queue_wait = metrics.queue_wait_seconds.labels(variant=name)
        self._batch_size = metrics.batch_size.labels(variant=name)
        self._inflight = metrics.inflight_batches.labels(variant=name)

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        """Whether the batching task is alive and admitting work."""
        return self._accepting and self._loop_task is not None and not self._loop_task.done()

    @property
    def queue_depth(self) -> int:
        """Entries waiting (dead ones not yet removed included)."""
        return len(self._queue)

    @property
    def inflight(self) -> int:
        """Batches in flight."""
        return len(self._batch_tasks)

    async def start(self) -> None:
        """Start the batching task (inside the running event loop)."""
        if self._loop_task is not None:
            raise RuntimeError(f"batcher {self.name} already started")
        self._slots = asyncio.Semaphore(self._max_inflight)
        self._accepting = True
        self._loop_task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

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

    def submit(self, items: Sequence[Any], lengths: Sequence[int], deadline: float) -> list[asyncio.Future[Any]]:
        """Queue the items of one request, all or none.

        Args:
            items: The prepared items (each becomes one batch row).
            lengths: Exact token count of each item.
            deadline: Monotonic time after which the items are dropped with DeadlineExceeded.

        Returns:
            One future per item, in order, resolving to :class:`Answered`.

        Raises:
            BackendUnavailable: The batcher is not running (starting up or draining).
            Overloaded: The queue has no room for all items.
        """
        if not self.running:
            raise BackendUnavailable(f"variant {self.name} is not accepting requests (draining or stopped)")
        if len(items) != len(lengths):
            raise ValueError(f"{len(items)} items but {len(lengths)} lengths")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        entries = [
            Entry(item=item, length=length, future=loop.create_future(), enqueued_at=now, deadline=deadline)
            for item, length in zip(items, lengths, strict=True)
        ]
        try:
            self._queue.put_many(entries, now=now)
        except ServiceError:
            self._metrics.requests_rejected_total.labels(reason="queue_full").inc(len(entries))
            raise
        return [e.future for e in entries]

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
            task = asyncio.create_task(self._process(plan.batch), name=f"batch-{self.name}")
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batch_tasks.discard(task)
        assert self._slots is not None
        self._slots.release()
        if self._flush_when_idle and not self._batch_tasks:
            self._queue.wake()  # the backend just went idle: entries waiting for companions can go now

    async def _process(self, batch: list[Entry]) -> None:
        self._batch_size.observe(len(batch))
        self._inflight.inc()
        started = time.perf_counter()
        try:
            # Nobody waits for this batch after its latest deadline: the adapter ends its backend call then, so a
            # stalled backend frees the in-flight slot instead of holding it while the queue behind it expires.
            left = max(e.deadline for e in batch) - time.monotonic()
            results = await self._process_fn([e.item for e in batch], max(0.0, left))
            if len(results) != len(batch):
                logger.error("%s: process returned %d results for %d items", self.name, len(results), len(batch))
                raise Internal("the inference backend returned a malformed result")
            elapsed = time.perf_counter() - started
            for e, value in zip(batch, results, strict=True):
                if e.future.done():  # the client went away or its deadline fired meanwhile
                    continue
                e.future.set_result(
                    Answered(
                        value=value,
                        queue_seconds=(e.taken_at or e.enqueued_at) - e.enqueued_at,
                        inference_seconds=elapsed,
                    )
                )
        except ServiceError as exc:
            # One failed call fails every item of the batch with the same error (Ray, TEI).
            self._fail(batch, exc)
        except asyncio.CancelledError:
            self._fail(batch, BackendUnavailable("gateway shut down while the request was being processed"))
            raise
        except Exception:
            # Unknown failures are bugs: the traceback goes to the log, the clients get a generic error.
            logger.exception("batch of %d for %s failed unexpectedly", len(batch), self.name)
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
