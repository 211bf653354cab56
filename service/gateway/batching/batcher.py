"""The dynamic batcher of one variant: waits, forms batches by the policy, calls ``process``, fans results out.

It knows nothing of the model (Ray Serve's ``@serve.batch`` shape): entries carry an opaque item and its exact
token count, and an async ``process(items) -> results`` supplied by the model adapter does the work of one batch
(:class:`service.gateway.model.ClassifierModel` pads, calls Triton and turns logits into probabilities).

One background task per variant forms batches; each batch then runs as its own task, at most
``max_inflight_batches`` at a time, so the next batch forms while one is in flight (TEI runs two batching tasks for
the same reason). A slot is acquired *before* a batch is taken: while every slot is busy, entries keep
accumulating and the next batch is as large as the limits allow, the way Triton's batcher waits for a free model
instance. Only the loop task removes entries from the queue, dead ones included.

Admission is by predicted completion (docs/reliability.md): a per-variant service-time model learned from the
batches themselves (:mod:`service.gateway.batching.service_time`) predicts when a new request would be answered —
the work still in flight, the queue ahead of it, its own batch — and the request is admitted only if that fits its
deadline and, while the backend is healthy, the SLO target. Otherwise it is refused at once with 429 and a
Retry-After derived from the predicted drain time. The count bound (``max_queue_size``) remains as a memory guard.

Across a backend restart, a batch whose call fails as unavailable waits (bounded by its deadlines) for the backend
to be ready and is retried once; meanwhile admission checks deadlines only, since no SLO can be met during an
outage and a client whose deadline allows waiting is better served late than refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from service.gateway.batching.policy import BatchLimits, flush_delay, take_batch
from service.gateway.batching.queue import Entry, RequestQueue
from service.gateway.batching.service_time import ServiceTimeModel
from service.gateway.errors import BackendUnavailable, DeadlineExceeded, Internal, Overloaded, ServiceError
from service.gateway.metrics import GatewayMetrics

logger = logging.getLogger("service.gateway.batching")

R = TypeVar("R")

#: The work of one batch: the entries' items in, one result per item out (same order), within ``timeout_seconds``.
ProcessFn = Callable[[list[Any], float], Awaitable[Sequence[R]]]
#: Whether the backend can take work now (used only while waiting out an outage).
ReadyFn = Callable[[], Awaitable[bool]]
#: How often a batch waiting out a backend outage re-checks readiness (a bounded wait, never past its deadlines).
READY_RETRY_SECONDS = 0.1
#: Bounds of the Retry-After header of a refusal (seconds).
RETRY_AFTER_BOUNDS = (1, 10)
#: Admission feedback: answered requests per adjustment window, the share of them allowed past the SLO, the
#: multiplicative decrease, the additive increase and the floor of the budget scale (Clipper's AIMD, applied to the
#: admission budget instead of the batch size).
FEEDBACK_WINDOW = 100
FEEDBACK_LATE_SHARE = 0.01
FEEDBACK_DECREASE = 0.8
FEEDBACK_INCREASE = 0.05
FEEDBACK_FLOOR = 0.25
#: The largest single cut of the budget scale (a window whose P99 was twice the SLO or worse halves it).
FEEDBACK_MAX_CUT = 0.5
#: Weight of the newest batch in the padding ratio's moving average.
PADDING_RATIO_WEIGHT = 0.1


@dataclass(frozen=True)
class AdmissionPolicy:
    """How requests are admitted.

    Attributes:
        slo_seconds: Latency target of an admitted request (None: deadlines only).
        slo_fraction: Share of the SLO the predicted completion may use (the rest covers what happens outside the
            batch: HTTP, tokenization, encoding, and prediction error).
        retry_on_unavailable: Wait for the backend and retry a batch once when its call fails as unavailable.
        recovery_grace_seconds: After an outage, admission keeps checking deadlines only for at least this long.
    """

    slo_seconds: float | None = 0.2
    slo_fraction: float = 0.8
    retry_on_unavailable: bool = True
    recovery_grace_seconds: float = 10.0


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
        admission: The admission policy (SLO target, retry across outages).
        ready: Whether the backend is ready (needed to wait out an outage; None: no retry).
        backend_parallelism: How many of this variant's batches the backend runs at the same time (Triton's
            instance count of the model, at most ``max_inflight_batches``); the predicted drain time divides by it.
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
        admission: AdmissionPolicy | None = None,
        ready: ReadyFn | None = None,
        backend_parallelism: int = 1,
    ) -> None:
        if max_inflight_batches < 1:
            raise ValueError(f"max_inflight_batches must be >= 1, got {max_inflight_batches}")
        if backend_parallelism < 1:
            raise ValueError(f"backend_parallelism must be >= 1, got {backend_parallelism}")
        self.name = name
        self.limits = limits
        self._process_fn = process
        self._flush_when_idle = flush_when_idle
        # With nothing in flight the backend is idle and waiting for companions only adds latency.
        self._idle_limits = dataclasses.replace(limits, max_wait_seconds=0.0)
        self._metrics = metrics
        self._max_inflight = max_inflight_batches
        #: Batches the backend works on at once: each runs on its own model instance, so the work ahead drains
        #: this many times faster than one batch after the other, but one batch is never faster than alone.
        self.parallelism = min(backend_parallelism, max_inflight_batches)
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
        self.admission = admission or AdmissionPolicy(slo_seconds=None)
        self._ready = ready
        self.service_time = ServiceTimeModel()
        #: In-flight batches: task -> (start time, predicted seconds).
        self._running: dict[asyncio.Task[None], tuple[float, float]] = {}
        self._outage = False
        self._recovering = False
        self._recovered_at = 0.0
        self._lanes_free = [0.0] * self.parallelism
        #: Padded tokens per real token of the recent batches (EWMA): converts the queue's token count into the
        #: padded work the service-time model is fitted on.
        self.padding_ratio = 1.0
        self._retry_after_base = retry_after_seconds
        self._metric_intercept = metrics.service_time_intercept_seconds.labels(variant=name)
        self._metric_per_token = metrics.service_time_per_token_seconds.labels(variant=name)
        self._metric_drain = metrics.predicted_drain_seconds.labels(variant=name)
        self._metric_retries = metrics.backend_retries_total.labels(variant=name)
        self._metric_scale = metrics.admission_budget_scale.labels(variant=name)
        #: Share of the SLO budget granted now; AIMD on the latency of answered requests (observe_latency).
        self.budget_scale = 1.0
        #: Latencies of the answers of the current feedback window.
        self._window: list[float] = []

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
        self._admit(lengths, deadline, now)
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

    # ---------------------------------------------------------------- predictions

    def predicted_drain_seconds(self, now: float | None = None) -> float:
        """Predicted time until the work in flight and in the queue is done (0 before the model is trained)."""
        now = time.monotonic() if now is None else now
        if not self.service_time.ready:
            return 0.0
        return self._inflight_left(now) + self._predict_queue(len(self._queue), self._queue.tokens) / self.parallelism

    def _inflight_left(self, now: float) -> float:
        if not self._running:
            return 0.0
        if self.parallelism == 1:
            # The backend works through the variant's in-flight batches one after the other, busy since the oldest
            # was sent.
            oldest = min(started for started, _ in self._running.values())
            return max(0.0, sum(predicted for _, predicted in self._running.values()) - (now - oldest))
        # Each in-flight batch runs on its own instance: what is left of each, shared by the instances.
        left = sum(max(0.0, predicted - (now - started)) for started, predicted in self._running.values())
        return left / self.parallelism

    def _predict_queue(self, rows: int, tokens: int) -> float:
        if rows <= 0:
            return 0.0
        # The model is fitted on padded tokens (rows x longest); the queue knows each text's own length, so its
        # tokens are scaled by the padding the batches actually had.
        padded = tokens * self.padding_ratio
        batches = max(math.ceil(rows / self.limits.max_batch_size), math.ceil(padded / self.limits.max_batch_tokens))
        return self.service_time.predict_tokens(batches, int(padded))

    def predicted_completion_seconds(self, lengths: Sequence[int], now: float | None = None) -> float:
        """Predicted time from now until a new request of texts of ``lengths`` tokens would be answered."""
        now = time.monotonic() if now is None else now
        rows, tokens = len(self._queue) + len(lengths), self._queue.tokens + sum(lengths)
        shared = self._inflight_left(now) + self._predict_queue(rows, tokens) / self.parallelism
        if self.parallelism == 1:
            return shared
        # Parallel instances drain the work ahead faster, but the request's own batch still runs whole on one.
        return max(shared, self._predict_queue(len(lengths), sum(lengths)))

    def precheck(self, deadline: float, texts: int = 1) -> None:
        """Refuse (429) at once when the work already ahead misses the budget, before the request costs anything.

        The data plane calls it before tokenizing, so under overload a refused request is cheap; :meth:`submit`
        checks again with the request's own exact size.

        Raises:
            Overloaded: The predicted drain time alone exceeds the deadline or the SLO budget.
            BackendUnavailable: The batcher is not running.
        """
        if not self.running:
            raise BackendUnavailable(f"variant {self.name} is not accepting requests (draining or stopped)")
        if self.service_time.ready:
            now = time.monotonic()
            self._check(self.predicted_drain_seconds(now), deadline, now, texts=texts)

    def observe_latency(self, seconds: float) -> None:
        """Feed back the end-to-end latency of one answered request (admission to answer, as the data plane saw it).

        The service-time model predicts the batch work; what happens outside it (a busy event loop, encoding,
        scheduling on a shared machine) it cannot see, and under overload that can double an admitted request's
        latency. So admission also corrects itself from the outcome: every :data:`FEEDBACK_WINDOW` answers, if
        more than :data:`FEEDBACK_LATE_SHARE` of them missed the SLO the budget shrinks by :data:`FEEDBACK_DECREASE`,
        or in proportion to the miss when the window's P99 overshot the SLO by more (``SLO / P99``, never below
        :data:`FEEDBACK_MAX_CUT` in one step: one window corrects most of an overshoot instead of several);
        if even the slowest one used less than 90% of the SLO it grows back by :data:`FEEDBACK_INCREASE` (up to 1).
        Outages and the recovery grace period do not count: admission then checks deadlines only.

        Args:
            seconds: The request's latency.
        """
        slo = self.admission.slo_seconds
        if slo is None or self._outage or self._recovering:
            return
        self._window.append(seconds)
        if len(self._window) < FEEDBACK_WINDOW:
            return
        window = sorted(self._window)
        self._window.clear()
        late = len(window) - bisect_right(window, slo)
        if late > FEEDBACK_LATE_SHARE * len(window):
            p99 = window[min(len(window) - 1, math.ceil(0.99 * len(window)) - 1)]
            cut = max(FEEDBACK_MAX_CUT, min(FEEDBACK_DECREASE, slo / p99))
            self.budget_scale = max(FEEDBACK_FLOOR, self.budget_scale * cut)
        elif window[-1] < 0.9 * slo:
            self.budget_scale = min(1.0, self.budget_scale + FEEDBACK_INCREASE)
        self._metric_scale.set(self.budget_scale)

    def _budget(self, deadline: float, now: float) -> float:
        budget = deadline - now
        slo = self.admission.slo_seconds
        if slo is None:
            return budget
        slo_budget = slo * self.admission.slo_fraction * self.budget_scale
        # During an outage no SLO can be met; deadlines still bound the wait (and the count bound the memory). After
        # it, the backlog that built up is worked off first: the SLO applies again once it fits the SLO, so the
        # clients who waited through the restart are not followed by a burst of refusals.
        # A restarted backend's first batches are slow (cold sessions) and the service-time model re-learns from
        # them: the SLO applies again after a grace period and once the backlog fits it.
        grace_over = now >= self._recovered_at + self.admission.recovery_grace_seconds
        if self._recovering and grace_over and self.predicted_drain_seconds(now) <= slo_budget:
            self._recovering = False
        if self._outage or self._recovering:
            return budget
        return min(budget, slo_budget)

    def _admit(self, lengths: Sequence[int], deadline: float, now: float) -> None:
        """Refuse (429) a request whose predicted completion misses its deadline or the SLO target."""
        if not self.service_time.ready or not lengths:
            return
        self._check(self.predicted_completion_seconds(lengths, now), deadline, now, texts=len(lengths))

    def saturated(self, deadline: float) -> bool:
        """Whether the work already ahead misses the budget of a request due at ``deadline`` (no side effects).

        The request-context middleware asks it before a body is even parsed, to shed overload at the least cost.
        """
        if not self.running or not self.service_time.ready:
            return False
        now = time.monotonic()
        return self.predicted_drain_seconds(now) > self._budget(deadline, now)

    def retry_after_seconds(self, now: float | None = None) -> int:
        """The Retry-After of a refusal now: the predicted drain time, clamped to :data:`RETRY_AFTER_BOUNDS`."""
        drain = self.predicted_drain_seconds(now)
        self._metric_drain.set(drain)
        low, high = RETRY_AFTER_BOUNDS
        return min(high, max(low, self._retry_after_base, math.ceil(drain)))

    def _check(self, predicted: float, deadline: float, now: float, *, texts: int) -> None:
        budget = self._budget(deadline, now)
        if predicted <= budget:
            return
        if not self._running and len(self._queue) == 0 and predicted <= deadline - now:
            # Nothing ahead: the request alone is the fastest it can ever be, so refusing it would only make the
            # client come back to the same answer. Only its own deadline can refuse it.
            return
        retry_after = self.retry_after_seconds(now)
        self._metrics.requests_rejected_total.labels(reason="predicted_late").inc(texts)
        raise Overloaded(
            f"variant {self.name} cannot answer in time: predicted {predicted * 1000:.0f} ms, "
            f"budget {max(0.0, budget) * 1000:.0f} ms; retry later",
            retry_after_seconds=retry_after,
        )

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
            predict = self.service_time.predict if self.service_time.ready else None
            plan = take_batch(self._queue.snapshot(), self._current_limits(), now, predict)
            self._queue.replace(plan.rest)
            self._drop(plan.expired, plan.cancelled)
            if not plan.batch:
                self._slots.release()
                continue
            for e in plan.batch:
                e.taken_at = now
                self._queue_wait.observe(now - e.enqueued_at)
            task = asyncio.create_task(self._process(plan.batch), name=f"batch-{self.name}")
            seq = max(e.length for e in plan.batch)
            self._running[task] = (now, self.service_time.predict(len(plan.batch), seq))
            self._batch_tasks.add(task)
            self._metric_drain.set(self.predicted_drain_seconds(now))
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batch_tasks.discard(task)
        self._running.pop(task, None)
        assert self._slots is not None
        self._slots.release()
        if self._flush_when_idle and not self._batch_tasks:
            self._queue.wake()  # the backend just went idle: entries waiting for companions can go now

    async def _process(self, batch: list[Entry]) -> None:
        self._batch_size.observe(len(batch))
        self._inflight.inc()
        started = time.perf_counter()
        seq = max(e.length for e in batch)
        real = sum(max(1, e.length) for e in batch)
        self.padding_ratio += PADDING_RATIO_WEIGHT * (len(batch) * max(1, seq) / real - self.padding_ratio)
        try:
            # Nobody waits for this batch after its latest deadline: the adapter ends its backend call then, so a
            # stalled backend frees the in-flight slot instead of holding it while the queue behind it expires.
            latest = max(e.deadline for e in batch)
            items = [e.item for e in batch]
            try:
                results = await self._process_fn(items, max(0.0, latest - time.monotonic()))
                self._learn(len(batch), seq, started)
                self._outage = False
            except BackendUnavailable:
                if self._ready is None or not self.admission.retry_on_unavailable:
                    raise
                results = await self._retry_after_outage(batch, items, latest)
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

    async def _retry_after_outage(self, batch: list[Entry], items: list[Any], latest: float) -> Sequence[R]:
        """Wait (bounded by the batch's deadlines) until the backend is ready, then run the batch once more."""
        assert self._ready is not None
        self._outage = True
        seq = max(e.length for e in batch)
        needed = self.service_time.predict(len(batch), seq) if self.service_time.ready else 0.0
        give_up = latest - needed
        while True:
            if all(e.future.done() for e in batch):
                raise BackendUnavailable("every client of the batch left during the outage")
            try:
                if await self._ready():
                    break
            except Exception:
                logger.debug("readiness probe failed during an outage", exc_info=True)
            if time.monotonic() + READY_RETRY_SECONDS >= give_up:
                raise BackendUnavailable(
                    f"inference server unavailable for variant {self.name} and the deadline does not allow waiting"
                )
            await asyncio.sleep(READY_RETRY_SECONDS)
        self._outage = False
        self._recovering = True
        self._recovered_at = time.monotonic()
        self._metric_retries.inc()
        started = time.perf_counter()
        # Exactly one retry: a second failure goes to the clients as it is (never two retries, never two results).
        results = await self._process_fn(items, max(0.0, latest - time.monotonic()))
        self._learn(len(batch), seq, started)
        return results

    def _learn(self, rows: int, seq: int, started: float) -> None:
        """Feed the service-time model with the time the backend spent on this batch alone.

        With more batches in flight than the backend has instances, a batch waits inside the backend while
        another runs, so its latency is not its cost: the backend's time on a batch is counted from when it was sent
        or when an instance last became free, whichever is later (a FIFO server's service time; with one instance,
        after the previous batch of the variant finished).
        """
        done = time.perf_counter()
        # One lane per backend instance: the batch ran from when it was sent or the lane it took last became
        # free, whichever is later (with one instance: after the previous batch finished).
        lane = min(range(len(self._lanes_free)), key=self._lanes_free.__getitem__)
        busy_from = max(started, self._lanes_free[lane])
        self._lanes_free[lane] = done
        self.service_time.observe(rows, seq, done - busy_from)
        snap = self.service_time.snapshot()
        self._metric_intercept.set(snap.intercept_seconds)
        self._metric_per_token.set(snap.per_token_seconds)

    @property
    def outage(self) -> bool:
        """Whether a batch is waiting out a backend outage (admission then checks deadlines only)."""
        return self._outage

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
