"""The gateway's running state: served models, one batcher per variant, the backend, and the draining flag.

Built by ``create_app`` and started/stopped by its lifespan; routes reach it through ``request.app.state``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.gateway.backend.base import InferenceBackend
from service.gateway.batching.batcher import AdmissionPolicy, DynamicBatcher
from service.gateway.batching.policy import BatchLimits
from service.gateway.metrics import GatewayMetrics
from service.gateway.model import ClassifierModel, Prediction
from service.gateway.repository import RepositoryError, VariantModel, load_variant_model
from service.gateway.sampler import ResourceSampler
from service.gateway.settings import Settings

logger = logging.getLogger("service.gateway")


class StartupError(RuntimeError):
    """The gateway cannot start with this configuration (message names the bad values)."""


@dataclass(frozen=True)
class ServedVariant:
    """One served variant: its model adapter and the batcher that feeds it.

    Attributes:
        model: Tokenizes at admission and runs batches (pads, calls the backend, softmax).
        batcher: The variant's queue and batch loop.
    """

    model: ClassifierModel
    batcher: DynamicBatcher[Prediction]


class GatewayRuntime:
    """Everything the routes need at request time.

    Args:
        settings: Validated settings.
        backend: The inference backend.
        metrics: The application's metrics.
    """

    def __init__(self, settings: Settings, backend: InferenceBackend, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.models: dict[str, VariantModel] = {}
        self.served: dict[str, ServedVariant] = {}
        #: The text-generation service (service/gateway/api/generate.py); it attaches itself in create_app.
        self.generation: Any = None
        self.server_max_batch_sizes: dict[str, int | None] = {}
        #: Triton's model instances per backend model: the batches it runs at the same time.
        self.server_instance_counts: dict[str, int] = {}
        self._draining = False
        self._drain_listeners: list[Callable[[], None]] = []
        self.started = False
        self.sampler = ResourceSampler(metrics, settings.resource_sample_interval_seconds)

    @property
    def draining(self) -> bool:
        """Whether the gateway refuses new work (SIGTERM received or stopping); readiness is false meanwhile."""
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        was, self._draining = self._draining, value
        if value and not was:
            for listener in list(self._drain_listeners):
                listener()

    def add_drain_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` once draining starts (e.g. the gRPC health service turns NOT_SERVING).

        It may be called from a signal handler, so it must only hand work to the event loop thread-safely.

        Args:
            listener: A callable without arguments.
        """
        self._drain_listeners.append(listener)

    async def start(self) -> None:
        """Load the repository files, wait for the backend, check limits, start one batcher per variant.

        Raises:
            StartupError: Missing model files, a backend that never becomes ready, or a gateway max_batch_size
                larger than the backend's.
        """
        s = self.settings
        try:
            for variant in s.variants:
                self.models[variant] = load_variant_model(
                    s.triton.model_repository, s.model_name(variant), variant, s.triton.model_version
                )
            adapters = {
                v: ClassifierModel(m, self.backend, self.metrics, tokenize_in_thread=s.batch.tokenize_in_thread)
                for v, m in self.models.items()
            }
        except RepositoryError as exc:
            raise StartupError(f"model repository {s.triton.model_repository}: {exc}") from None
        wanted = {m.model_name: m.version for m in self.models.values()}
        try:
            await self.backend.start(wanted, timeout_seconds=s.triton.startup_timeout_seconds)
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        for m in self.models.values():
            server_max = await self.backend.max_batch_size(m.model_name)
            self.server_max_batch_sizes[m.model_name] = server_max
            self.server_instance_counts[m.model_name] = await self.backend.instance_count(m.model_name)
            if server_max is None:
                raise StartupError(f"model {m.model_name} does not accept batches (its max_batch_size is 0)")
            if s.batch.max_batch_size > server_max:
                raise StartupError(
                    f"gateway batch.max_batch_size ({s.batch.max_batch_size}) > triton max_batch_size of "
                    f"{m.model_name} ({server_max}); lower GATEWAY_BATCH__MAX_BATCH_SIZE"
                )
        limits = BatchLimits(
            max_batch_size=s.batch.max_batch_size,
            max_wait_seconds=s.batch.max_wait_seconds,
            max_batch_tokens=s.batch.max_batch_tokens,
            length_bucket_edges=s.batch.length_bucket_edges,
        )
        for variant, m in self.models.items():
            self.metrics.init_variant(variant, m.model_name)
            adapter = adapters[variant]
            batcher: DynamicBatcher[Prediction] = DynamicBatcher(
                variant,
                adapter.process,
                limits=limits,
                max_queue_size=s.batch.max_queue_size,
                max_inflight_batches=s.batch.max_inflight_batches,
                retry_after_seconds=s.retry_after_seconds,
                metrics=self.metrics,
                flush_when_idle=s.batch.flush_when_idle,
                admission=AdmissionPolicy(
                    slo_seconds=s.slo_seconds(variant),
                    slo_fraction=s.slo_admission_fraction,
                    retry_on_unavailable=s.retry_on_unavailable,
                ),
                ready=self.backend.ready,
                backend_parallelism=self.server_instance_counts.get(m.model_name, 1),
            )
            if self.server_instance_counts.get(m.model_name, 1) > s.batch.max_inflight_batches:
                logger.warning(
                    "%s has %d model instances but the gateway keeps at most %d batches in flight "
                    "(GATEWAY_BATCH__MAX_INFLIGHT_BATCHES): some instances stay idle",
                    m.model_name,
                    self.server_instance_counts.get(m.model_name, 1),
                    s.batch.max_inflight_batches,
                )
            self.served[variant] = ServedVariant(model=adapter, batcher=batcher)
        pair = s.shadow_pair()
        if pair is not None:
            self.metrics.init_shadow(*pair)
        for sv in self.served.values():
            await sv.batcher.start()
        self.sampler.start()
        self.started = True
        logger.info("gateway ready: variants %s, backend models %s", list(self.models), wanted)

    async def stop(self) -> None:
        """Drain: refuse new work, let every batcher finish what it accepted (bounded), close the backend."""
        self.draining = True
        await asyncio.gather(*(sv.batcher.stop(self.settings.drain_timeout_seconds) for sv in self.served.values()))
        await self.backend.aclose()
        self.sampler.stop()
        self.started = False

    async def readiness(self) -> tuple[bool, str]:
        """Say whether the gateway should receive traffic.

        Returns:
            ``(ready, reason)``; the reason explains a ``False``.
        """
        if self.draining:
            return False, "gateway is draining"
        if not self.started or not all(sv.batcher.running for sv in self.served.values()):
            return False, "batchers are not running"
        if not await self.backend.ready():
            return False, "inference server or a served model is not ready"
        return True, "ready"
