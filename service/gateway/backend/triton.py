"""The Triton backend: one async gRPC call per batch (``tritonclient.grpc.aio``).

gRPC rather than HTTP because Triton's HTTP frontend does not notice a client going away (triton#7077) and the
async gRPC client supports a per-call ``client_timeout``. Errors are mapped by their gRPC status string, never by
message text (rule 20); ``debug_details`` stay in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import KeepAliveOptions
from tritonclient.utils import InferenceServerException

from service.gateway.backend.base import InferOutput
from service.gateway.errors import BackendError, BackendUnavailable, DeadlineExceeded, ServiceError
from service.gateway.settings import TritonSettings

logger = logging.getLogger("service.gateway.backend.triton")

#: How often start-up re-checks readiness while Triton loads its models (a bounded retry, not a queue poll).
_STARTUP_RETRY_SECONDS = 0.25
#: tritonclient's own message limit (INT32_MAX): batches are bounded by the gateway's limits, not by gRPC.
_MAX_MESSAGE_BYTES = 2**31 - 1


def map_triton_error(exc: InferenceServerException, model: str) -> ServiceError:
    """Translate a tritonclient exception into the gateway's error.

    Args:
        exc: The client exception.
        model: The model called (for the message).

    Returns:
        ``BackendUnavailable`` for UNAVAILABLE, ``DeadlineExceeded`` for DEADLINE_EXCEEDED, else ``BackendError``.
    """
    status = str(exc.status() or "")
    logger.warning(
        "triton call to %s failed: status=%s message=%s debug=%s", model, status, exc.message(), exc.debug_details()
    )
    if status.endswith("UNAVAILABLE"):
        return BackendUnavailable(f"inference server unavailable for model {model}")
    if status.endswith("DEADLINE_EXCEEDED"):
        return DeadlineExceeded(f"inference server did not answer for model {model} in time")
    return BackendError(f"inference server failed for model {model} ({status or 'unknown status'})")


def channel_args(settings: TritonSettings) -> list[tuple[str, int]]:
    """gRPC channel options towards Triton: tritonclient's defaults plus a short reconnect backoff.

    After Triton restarts, a channel in gRPC's default backoff (growing to 120 s) would keep failing calls long
    after the server is back; capping the backoff bounds the gateway's recovery time. Calls made while the channel
    is disconnected still fail at once with UNAVAILABLE (no wait-for-ready), which the gateway answers with 503.

    Args:
        settings: Triton connection settings.

    Returns:
        The channel arguments.
    """
    keepalive = KeepAliveOptions()
    backoff_ms = int(settings.reconnect_backoff_max_seconds * 1000)
    return [
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", min(100, backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(100, backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
    ]


class TritonBackend:
    """:class:`InferenceBackend` over Triton's async gRPC API.

    The client is created in :meth:`start` (inside the running event loop), never at import or construction.

    Args:
        settings: Triton connection settings.
    """

    def __init__(self, settings: TritonSettings) -> None:
        self._settings = settings
        self._client: grpcclient.InferenceServerClient | None = None
        self._models: dict[str, int] = {}

    @property
    def url(self) -> str:
        """Triton's gRPC endpoint."""
        return self._settings.grpc_url

    def _require_client(self) -> grpcclient.InferenceServerClient:
        if self._client is None:
            raise BackendUnavailable("inference server client is not started")
        return self._client

    async def start(self, models: Mapping[str, int], *, timeout_seconds: float) -> None:
        """Connect and wait (bounded) until Triton and every model version are ready.

        Args:
            models: Model name -> version.
            timeout_seconds: Longest wait.

        Raises:
            RuntimeError: Naming the URL and the models that are not ready.
        """
        self._models = dict(models)
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(
                url=self._settings.grpc_url, channel_args=channel_args(self._settings)
            )
        give_up = time.monotonic() + timeout_seconds
        while True:
            if await self.ready():
                return
            if time.monotonic() >= give_up:
                raise RuntimeError(
                    f"Triton at {self._settings.grpc_url} or models {sorted(self._models)} (versions "
                    f"{self._models}) not ready after {timeout_seconds:g} s"
                )
            await asyncio.sleep(_STARTUP_RETRY_SECONDS)

    async def infer(self, model: str, version: int, input_ids: np.ndarray, attention_mask: np.ndarray) -> InferOutput:
        """Run one batch as one Triton request.

        Args:
            model: Triton model name.
            version: Model version.
            input_ids: INT64 [rows, seq].
            attention_mask: INT64 [rows, seq].

        Returns:
            The logits and the version Triton reports.

        Raises:
            BackendUnavailable: Triton unreachable or the model unavailable.
            DeadlineExceeded: ``client_timeout_seconds`` passed.
            BackendError: Any other failure, including a missing output.
        """
        client = self._require_client()
        inputs = [
            grpcclient.InferInput("input_ids", list(input_ids.shape), "INT64"),
            grpcclient.InferInput("attention_mask", list(attention_mask.shape), "INT64"),
        ]
        inputs[0].set_data_from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        inputs[1].set_data_from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64))
        try:
            result = await client.infer(
                model,
                inputs,
                model_version=str(version),
                outputs=[grpcclient.InferRequestedOutput("logits")],
                client_timeout=self._settings.client_timeout_seconds,
            )
        except InferenceServerException as exc:
            raise map_triton_error(exc, model) from None
        logits = result.as_numpy("logits")
        if logits is None:
            raise BackendError(f"inference server returned no 'logits' output for model {model}")
        return InferOutput(
            logits=np.asarray(logits, dtype=np.float32),
            model_version=result.get_response().model_version or str(version),
        )

    async def ready(self) -> bool:
        """Whether Triton and every started model version answer ready (bounded by health_timeout_seconds)."""
        if self._client is None:
            return False
        timeout = self._settings.health_timeout_seconds
        try:
            if not await self._client.is_server_ready(client_timeout=timeout):
                return False
            for model, version in self._models.items():
                if not await self._client.is_model_ready(model, str(version), client_timeout=timeout):
                    return False
        except InferenceServerException as exc:
            logger.debug("triton readiness check failed: %s", exc)
            return False
        return True

    async def max_batch_size(self, model: str) -> int | None:
        """Read ``max_batch_size`` from Triton's model configuration.

        Args:
            model: Triton model name.

        Returns:
            The configured value, or None when it is 0 (Triton does not batch the model).
        """
        value = int((await self._model_config(model)).max_batch_size)
        return value or None

    async def instance_count(self, model: str) -> int:
        """Model instances in Triton's configuration: batches of ``model`` that run at the same time.

        A KIND_GPU group counts once per listed GPU (all GPUs when none are listed count as one here: the gateway
        cannot see the node's devices, and one is the safe, slower assumption for admission).
        """
        cfg = await self._model_config(model)
        total = sum(max(1, g.count) * max(1, len(g.gpus)) for g in cfg.instance_group)
        return max(1, total)

    async def _model_config(self, model: str) -> Any:
        client = self._require_client()
        version = self._models.get(model)
        try:
            cfg = await client.get_model_config(
                model, "" if version is None else str(version), client_timeout=self._settings.health_timeout_seconds
            )
        except InferenceServerException as exc:
            raise map_triton_error(exc, model) from None
        return cfg.config

    async def aclose(self) -> None:
        """Close the gRPC channel."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
