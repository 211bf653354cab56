"""The backend interface: what the batcher needs from an inference server."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class InferOutput:
    """The answer to one batch.

    Attributes:
        logits: FP32 array [rows, num_labels].
        model_version: The model version that answered, as the server reports it.
    """

    logits: np.ndarray
    model_version: str


@runtime_checkable
class InferenceBackend(Protocol):
    """An inference server holding one model per variant.

    Implementations raise only :class:`service.gateway.errors.ServiceError` subclasses from ``infer``:
    ``BackendUnavailable`` (503), ``DeadlineExceeded`` (504) or ``BackendError`` (502).
    """

    async def start(self, models: Mapping[str, int], *, timeout_seconds: float) -> None:
        """Connect and wait until the server and ``models`` are ready.

        Args:
            models: Model name -> version that will be requested.
            timeout_seconds: How long to wait for readiness.

        Raises:
            RuntimeError: If the server or a model is not ready in time.
        """

    async def infer(self, model: str, version: int, input_ids: np.ndarray, attention_mask: np.ndarray) -> InferOutput:
        """Run one batch; exactly one server call.

        Args:
            model: Model name.
            version: Model version.
            input_ids: INT64 [rows, seq].
            attention_mask: INT64 [rows, seq].

        Returns:
            The logits and the answering model version.
        """

    async def ready(self) -> bool:
        """Whether the server and every model given to ``start`` are ready now (never raises)."""

    async def max_batch_size(self, model: str) -> int | None:
        """The server-side max_batch_size of ``model``, or None if the server does not limit it."""

    async def instance_count(self, model: str) -> int:
        """How many batches of ``model`` the server runs at the same time (its model instances; at least 1)."""

    async def aclose(self) -> None:
        """Release connections."""
