"""The data plane: what every protocol asks of the gateway, in protocol-neutral types.

v1 REST (:mod:`service.gateway.api.rest_v1`), v2 REST (:mod:`service.gateway.api.rest_v2`) and v2 gRPC
(:mod:`service.gateway.api.grpc_v2`) each decode their request, call one method here, and encode the answer; none
of them repeats a rule. This is the one place that validates texts, resolves the variant (and the v2 model name),
applies the deadline and the drain state, submits to the variant's batcher, waits (the deadline, or the client
going away), and describes models and readiness.

Where a request goes, by file::

    decoded    api/rest_v1.py, api/rest_v2.py (+ api/v2_codec.py), api/grpc_v2.py (+ api/v2_codec.py)
    validated  dataplane.py            (texts, variant, model name, deadline, drain state)
    queued     batching/queue.py       (admission: all or none, 429 when full)
    batched    batching/policy.py + batching/batcher.py
    prepared   model.py                (exact tokenization at admission, padding, softmax)
    sent       backend/triton.py       (one gRPC call per batch)
    measured   metrics.py              (every series; transports record requests through one method)
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

import numpy as np

from service import __version__
from service.gateway.batching.batcher import Answered
from service.gateway.errors import (
    BackendUnavailable,
    ClientClosedRequest,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
)
from service.gateway.model import Prediction
from service.gateway.runtime import GatewayRuntime, ServedVariant

logger = logging.getLogger("service.gateway.dataplane")

#: The server name the v2 protocols report.
SERVER_NAME = "loraserve-gateway"
#: Deadline of a shadow comparison: it only runs on an idle backend, so it is quick or abandoned.
SHADOW_DEADLINE_SECONDS = 5.0


@dataclass
class CallInfo:
    """What the data plane learned about a call, for the transport's metrics even when the call fails.

    Attributes:
        variant: The served variant the call resolved to (bounded: only served variants are ever set).
    """

    variant: str | None = None


@dataclass(frozen=True)
class Classified:
    """The answer to one classification call, in input order.

    Attributes:
        variant: The variant that answered.
        model: Its Triton model name.
        model_version: The version Triton reported.
        labels: The label of each probability column, in order.
        probabilities: FP64 [texts, labels].
        queue_seconds: The longest time one of the texts waited in the queue.
        inference_seconds: The longest time one of their batches spent in the model adapter.
    """

    variant: str
    model: str
    model_version: str
    labels: tuple[str, ...]
    probabilities: np.ndarray
    queue_seconds: float
    inference_seconds: float

    def best(self) -> list[tuple[str, float]]:
        """The most probable label of each text and its probability."""
        idx = self.probabilities.argmax(axis=1)
        return [(self.labels[int(i)], float(self.probabilities[r, int(i)])) for r, i in enumerate(idx)]


@dataclass(frozen=True)
class ModelDescription:
    """A served model as the protocols describe it.

    Attributes:
        name: The requested model name (``<prefix>`` or ``<prefix>_<variant>``).
        variant: The variant the name fixes; None for the prefix name (the request's ``variant`` picks).
        versions: The versions served under the name.
        labels: The class names (of the default variant for the prefix name).
        max_client_batch_size: Most texts one request may carry.
    """

    name: str
    variant: str | None
    versions: tuple[str, ...]
    labels: tuple[str, ...]
    max_client_batch_size: int


@dataclass(frozen=True)
class VariantInfo:
    """One served variant, for ``/v1/models``."""

    variant: str
    model: str
    version: int
    labels: tuple[str, ...]
    max_length: int
    server_max_batch_size: int | None
    service_time: dict[str, float | int | bool | None]


class DataPlane:
    """The protocol-neutral operations of the gateway, over its runtime.

    Args:
        runtime: The gateway runtime (settings, served variants, backend, drain state).
    """

    def __init__(self, runtime: GatewayRuntime, *, rng: random.Random | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self._shadow_pair = runtime.settings.shadow_pair()
        self._rng = rng or random.Random()
        self._shadow_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ validation

    def check_texts(self, texts: Sequence[str]) -> None:
        """Apply the per-request limits every protocol shares.

        Raises:
            InvalidInput: No texts, or a text that is empty or only whitespace (nothing to classify).
            PayloadTooLarge: More texts than ``max_client_batch_size`` or a text over ``max_text_chars``.
        """
        s = self.settings
        if not texts:
            raise InvalidInput("no texts to classify")
        self.check_count(len(texts))
        for i, t in enumerate(texts):
            if len(t) > s.max_text_chars:
                raise PayloadTooLarge(f"text {i} has {len(t)} characters; the limit is {s.max_text_chars}")
            if not t.strip():
                raise InvalidInput(f"text {i} is empty or only whitespace")

    def check_count(self, count: int) -> None:
        """Refuse a request of more than ``max_client_batch_size`` texts (transports call it before decoding).

        Raises:
            PayloadTooLarge: ``count`` is over the limit.
        """
        limit = self.settings.max_client_batch_size
        if count > limit:
            raise PayloadTooLarge(f"{count} texts in one request; the limit is {limit}")

    def resolve_variant(self, variant: str | None) -> ServedVariant:
        """Return the served variant ``variant`` (the default variant when None).

        Raises:
            InvalidInput: The variant is not served.
        """
        name = variant or self.settings.default_variant
        served = self.runtime.served.get(name)
        if served is None:
            raise InvalidInput(f"unknown variant {name!r}; served variants: {', '.join(self.runtime.served)}")
        return served

    def resolve_model(self, model_name: str, version: str = "") -> str | None:
        """Map an Open Inference Protocol model name to the variant it fixes.

        The gateway exposes ``<prefix>`` (the variant comes from the ``variant`` parameter, else the default) and
        ``<prefix>_<variant>`` for each served variant (the Triton model names, so a client can point at the gateway
        instead of Triton without renaming anything).

        Args:
            model_name: The requested model.
            version: The requested version; "" means any. Only the served version exists.

        Returns:
            The variant the name fixes, or None for the prefix name.

        Raises:
            ModelNotFound: Unknown name or version.
        """
        models = self.runtime.models
        if model_name == self.settings.triton.model_name_prefix:
            variant = None
            versions = {str(m.version) for m in models.values()}
        else:
            variant = next((v for v, m in models.items() if m.model_name == model_name), None)
            if variant is None:
                raise ModelNotFound(f"unknown model {model_name!r}; served models: {', '.join(self.served_models())}")
            versions = {str(models[variant].version)}
        if version and version not in versions:
            raise ModelNotFound(
                f"model {model_name!r} has no version {version!r}; served: {', '.join(sorted(versions))}"
            )
        return variant

    def served_models(self) -> list[str]:
        """The model names the v2 protocols accept: the prefix, then one per variant."""
        return [self.settings.triton.model_name_prefix, *(m.model_name for m in self.runtime.models.values())]

    @staticmethod
    def pick_variant(fixed: str | None, requested: str | None) -> str | None:
        """Combine the variant a model name fixes with a ``variant`` request parameter.

        Raises:
            InvalidInput: Both are given and differ.
        """
        if fixed is not None and requested is not None and requested != fixed:
            raise InvalidInput(f"model fixes variant {fixed!r} but the request asks for {requested!r}")
        return fixed or requested

    def deadline(self, arrived: float, *client_budgets_seconds: float | None) -> float:
        """The request's monotonic deadline: the server timeout, shortened (never extended) by client budgets.

        Args:
            arrived: Monotonic arrival time.
            *client_budgets_seconds: Budgets the client gave (None for absent): a body field, a header, a gRPC
                deadline, the v2 ``timeout`` parameter.
        """
        budget = self.settings.request_timeout_seconds
        for b in client_budgets_seconds:
            if b is not None:
                budget = min(budget, max(0.0, b))
        return arrived + budget

    # ------------------------------------------------------------------ inference

    async def classify(
        self,
        texts: Sequence[str],
        *,
        variant: str | None,
        deadline: float,
        disconnected: Awaitable[None] | None = None,
        info: CallInfo | None = None,
    ) -> Classified:
        """Validate, queue and wait for the texts' answers, the deadline, or the client leaving.

        If this coroutine is cancelled (a gRPC client cancelled or its deadline fired), or the client disconnects, or
        the deadline passes, the texts' futures are cancelled, so texts still queued are dropped before they reach
        Triton and counted as ``client_disconnect``.

        Args:
            texts: The decoded texts.
            variant: The requested variant (None: the default).
            deadline: Monotonic deadline (:meth:`deadline`).
            disconnected: Completes when the client goes away (HTTP); None when cancellation signals it (gRPC).
            info: Filled with the resolved variant as soon as it is known.

        Raises:
            InvalidInput, PayloadTooLarge: The texts or the variant break the rules.
            BackendUnavailable: The gateway is draining or the backend failed so.
            Overloaded: The queue has no room (429 / RESOURCE_EXHAUSTED).
            DeadlineExceeded: The deadline passed first.
            ClientClosedRequest: ``disconnected`` completed first.
            ServiceError: Whatever the batch failed with.
        """
        started = time.monotonic()
        try:
            if self.runtime.draining:
                raise BackendUnavailable("gateway is draining; retry on another instance")
            self.check_texts(texts)
            served = self.resolve_variant(variant)
            if info is not None:
                info.variant = served.model.model.variant
            if deadline <= time.monotonic():
                raise DeadlineExceeded("deadline passed before the request was queued")
            served.batcher.precheck(deadline, len(texts))  # refuse an overload before tokenizing
            rows = await served.model.prepare(texts)
            futures = served.batcher.submit(rows, [len(r) for r in rows], deadline)
        except BaseException:
            if asyncio.iscoroutine(disconnected):
                disconnected.close()  # never started: close it so Python does not warn about an unawaited coroutine
            raise
        answers = await _wait_all(futures, deadline, disconnected)
        served.batcher.observe_latency(time.monotonic() - started)
        m = served.model.model
        predictions: list[Prediction] = [a.value for a in answers]
        done = Classified(
            variant=m.variant,
            model=m.model_name,
            model_version=predictions[0].model_version,
            labels=m.labels,
            probabilities=np.stack([p.probabilities for p in predictions]),
            queue_seconds=max(a.queue_seconds for a in answers),
            inference_seconds=max(a.inference_seconds for a in answers),
        )
        self._maybe_shadow(texts, done)
        return done

    def shed_before_parsing(self) -> Overloaded | None:
        """A 429 for an inference request whose body is not parsed yet, when every served variant is saturated.

        Under overload most of a refused request's cost is decoding it; when no variant could take any request
        now (the predicted drain of each exceeds its SLO budget), refusing before decoding keeps the CPU for the
        admitted work. A request that one variant could still take is decoded and admitted or refused normally.
        """
        served = list(self.runtime.served.values())
        if self.runtime.draining or not served:
            return None
        deadline = time.monotonic() + self.settings.request_timeout_seconds
        if not all(sv.batcher.saturated(deadline) for sv in served):
            return None
        self.runtime.metrics.requests_rejected_total.labels(reason="predicted_late").inc()
        retry_after = min(sv.batcher.retry_after_seconds() for sv in served)
        return Overloaded("every variant is saturated; retry later", retry_after_seconds=retry_after)

    # ------------------------------------------------------------------ shadow agreement

    def _maybe_shadow(self, texts: Sequence[str], done: Classified) -> None:
        """Also classify a sample of the primary variant's texts with the shadow variant, on idle capacity only."""
        pair = self._shadow_pair
        if pair is None or done.variant != pair[0] or self.runtime.draining:
            return
        if self._shadow_task is not None and not self._shadow_task.done():
            return  # one comparison at a time: shadow work never piles up
        if self._rng.random() >= self.settings.shadow.fraction:
            return
        primary, shadow = (self.runtime.served[v].batcher for v in pair)
        if primary.queue_depth or shadow.queue_depth or shadow.inflight:
            return  # not idle: real requests come first
        self._shadow_task = asyncio.create_task(self._shadow(list(texts), done), name="shadow-agreement")

    async def _shadow(self, texts: list[str], done: Classified) -> None:
        primary, shadow = self._shadow_pair or ("", "")
        served = self.runtime.served[shadow]
        metrics = self.runtime.metrics
        try:
            rows = await served.model.prepare(texts)
            futures = served.batcher.submit(rows, [len(r) for r in rows], time.monotonic() + SHADOW_DEADLINE_SECONDS)
            answers = await _wait_all(futures, time.monotonic() + SHADOW_DEADLINE_SECONDS, None)
        except Exception as exc:  # noqa: BLE001 - a shadow comparison that fails is skipped, never reported to clients
            logger.debug("shadow comparison skipped: %s", exc)
            return
        shadow_labels = served.model.model.labels
        if tuple(shadow_labels) != tuple(done.labels):
            logger.warning("shadow variant %s has other labels than %s: not comparable", shadow, primary)
            return
        reference = np.stack([a.value.probabilities for a in answers])
        agree = int((reference.argmax(axis=1) == done.probabilities.argmax(axis=1)).sum())
        metrics.shadow_comparisons_total.labels(primary=primary, shadow=shadow).inc(len(texts))
        metrics.shadow_agreements_total.labels(primary=primary, shadow=shadow).inc(agree)
        hist = metrics.shadow_probability_difference.labels(primary=primary, shadow=shadow)
        for diff in np.abs(reference - done.probabilities).max(axis=1):
            hist.observe(float(diff))

    async def aclose(self) -> None:
        """Cancel a shadow comparison still running (shutdown)."""
        task, self._shadow_task = self._shadow_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # ------------------------------------------------------------------ description and health

    async def readiness(self) -> tuple[bool, str]:
        """Whether the gateway should receive traffic, and why not."""
        return await self.runtime.readiness()

    async def model_ready(self, variant: str | None) -> bool:
        """Whether ``variant`` (every variant for None) can be served now."""
        rt = self.runtime
        if rt.draining or not rt.started:
            return False
        served = [rt.served[variant]] if variant is not None else list(rt.served.values())
        return all(s.batcher.running for s in served) and await rt.backend.ready()

    def describe(self, model_name: str, version: str = "") -> ModelDescription:
        """Describe a v2 model name (raises ModelNotFound for an unknown one)."""
        variant = self.resolve_model(model_name, version)
        models = self.runtime.models
        chosen = [models[variant]] if variant is not None else list(models.values())
        labels = models[variant or self.settings.default_variant].labels
        return ModelDescription(
            name=model_name,
            variant=variant,
            versions=tuple(sorted({str(m.version) for m in chosen})),
            labels=tuple(labels),
            max_client_batch_size=self.settings.max_client_batch_size,
        )

    def variants(self) -> list[VariantInfo]:
        """Every served variant (``/v1/models``)."""
        rt = self.runtime
        return [
            VariantInfo(
                variant=v,
                model=m.model_name,
                version=m.version,
                labels=m.labels,
                max_length=m.max_length,
                server_max_batch_size=rt.server_max_batch_sizes.get(m.model_name),
                service_time=self._service_time(v),
            )
            for v, m in rt.models.items()
        ]

    def _service_time(self, variant: str) -> dict[str, float | int | bool | None]:
        batcher = self.runtime.served[variant].batcher
        snap = batcher.service_time.snapshot()
        return {
            "intercept_seconds": snap.intercept_seconds,
            "per_token_seconds": snap.per_token_seconds,
            "samples": snap.samples,
            "ready": snap.ready,
            "predicted_drain_seconds": batcher.predicted_drain_seconds(),
            "backend_parallelism": batcher.parallelism,
            "padding_ratio": round(batcher.padding_ratio, 3),
            "budget_scale": batcher.budget_scale,
            "slo_seconds": batcher.admission.slo_seconds,
        }

    @staticmethod
    def server_metadata() -> tuple[str, str]:
        """``(name, version)`` of the gateway."""
        return SERVER_NAME, __version__


async def _wait_all(
    futures: list[asyncio.Future[Answered[Prediction]]], deadline: float, disconnected: Awaitable[None] | None
) -> list[Answered[Prediction]]:
    """Wait for every future, the deadline or the disconnect; cancel what is left whichever comes first."""
    gathered = asyncio.gather(*futures)
    # Whatever ends the wait, the outcome is consumed, so asyncio never logs "exception was never retrieved".
    gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
    watcher = asyncio.ensure_future(disconnected) if disconnected is not None else None
    try:
        waiting: set[asyncio.Future[object]] = {gathered}
        if watcher is not None:
            waiting.add(watcher)
        done, _ = await asyncio.wait(
            waiting, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
        )
        if gathered in done:
            return gathered.result()
        if watcher is not None and watcher in done:
            raise ClientClosedRequest("client disconnected")
        raise DeadlineExceeded("deadline passed before the answer was ready")
    finally:
        if watcher is not None:
            watcher.cancel()
        # Cancelling the unanswered futures tells the batcher to drop texts still queued (counted by reason); this
        # also covers a request split over two batches when the first one failed.
        if not gathered.done():
            gathered.cancel()
        for f in futures:
            if not f.done():
                f.cancel()
