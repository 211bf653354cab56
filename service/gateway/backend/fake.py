"""A deterministic in-process backend for tests and local runs without Triton.

Logits are a fixed function of the token ids, so a text always gets the same answer whatever batch it lands in.
Tests steer it: an added latency, a gate that holds calls until released, an exception to raise, a wrong number of
result rows, readiness, and a server-side max_batch_size.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.gateway.backend.base import InferOutput
from service.triton import repository as contract


@dataclass(frozen=True)
class FakeCall:
    """One recorded ``infer`` call.

    Attributes:
        model: Model name.
        version: Model version.
        rows: Batch rows.
        seq_len: Padded sequence length.
        real_lengths: Unpadded length of every row.
    """

    model: str
    version: int
    rows: int
    seq_len: int
    real_lengths: tuple[int, ...]


def fake_logits(input_ids: np.ndarray, attention_mask: np.ndarray, num_labels: int) -> np.ndarray:
    """The fake model: logits from masked token ids, independent of padding.

    Args:
        input_ids: INT64 [rows, seq].
        attention_mask: INT64 [rows, seq].
        num_labels: Output columns.

    Returns:
        FP32 [rows, num_labels].
    """
    masked = (input_ids * attention_mask).astype(np.float64)
    total = masked.sum(axis=1, keepdims=True)
    cols = np.arange(1, num_labels + 1, dtype=np.float64)[None, :]
    return (np.sin(total * cols / 997.0) * 3.0).astype(np.float32)


class FakeBackend:
    """Deterministic backend implementing :class:`InferenceBackend`.

    Args:
        num_labels: Columns of the returned logits.
        latency_seconds: Simulated compute time per call.
        fail_with: Exception raised by every ``infer`` call while set.
        row_delta: Added to the number of returned rows (non-zero simulates a broken server).
        is_ready: What ``ready()`` answers.
        server_max_batch_size: What ``max_batch_size()`` answers.
        server_instance_count: What ``instance_count()`` answers.
        rolled_models: Models whose logit columns are rotated by one (a deliberately wrong model, e.g. for the
            shadow-agreement tests: its top label always differs from the others').
    """

    def __init__(
        self,
        num_labels: int,
        *,
        latency_seconds: float = 0.0,
        fail_with: BaseException | None = None,
        row_delta: int = 0,
        is_ready: bool = True,
        server_max_batch_size: int | None = 64,
        server_instance_count: int = 1,
        rolled_models: Sequence[str] = (),
    ) -> None:
        self.num_labels = num_labels
        self.rolled_models = frozenset(rolled_models)
        self.latency_seconds = latency_seconds
        self.fail_with = fail_with
        self.row_delta = row_delta
        self.is_ready = is_ready
        self.server_max_batch_size = server_max_batch_size
        self.server_instance_count = server_instance_count
        self.calls: list[FakeCall] = []
        self.gate: asyncio.Event | None = None
        self.entered = 0
        self._entered_changed = asyncio.Condition()
        self.started_models: dict[str, int] = {}
        self.closed = False

    def hold(self) -> asyncio.Event:
        """Make every following ``infer`` wait until the returned event is set."""
        self.gate = asyncio.Event()
        return self.gate

    async def wait_entered(self, count: int, timeout_seconds: float = 5.0) -> None:
        """Wait until ``count`` calls have entered ``infer`` (for tests that hold calls in flight).

        Raises:
            TimeoutError: If fewer calls arrived within ``timeout_seconds``.
        """
        async with self._entered_changed:
            await asyncio.wait_for(self._entered_changed.wait_for(lambda: self.entered >= count), timeout_seconds)

    async def start(self, models: Mapping[str, int], *, timeout_seconds: float) -> None:
        """Record the models; nothing to connect to."""
        self.started_models = dict(models)

    async def infer(self, model: str, version: int, input_ids: np.ndarray, attention_mask: np.ndarray) -> InferOutput:
        """Answer one batch with :func:`fake_logits`."""
        async with self._entered_changed:
            self.entered += 1
            self._entered_changed.notify_all()
        self.calls.append(
            FakeCall(
                model,
                version,
                int(input_ids.shape[0]),
                int(input_ids.shape[1]),
                tuple(int(x) for x in attention_mask.sum(axis=1)),
            )
        )
        if self.gate is not None:
            await self.gate.wait()
        if self.latency_seconds > 0:
            await asyncio.sleep(self.latency_seconds)  # simulated compute time, not a poll
        if self.fail_with is not None:
            raise self.fail_with
        logits = fake_logits(input_ids, attention_mask, self.num_labels)
        if model in self.rolled_models:
            logits = np.roll(logits, 1, axis=1)
        rows = max(0, logits.shape[0] + self.row_delta)
        if rows > logits.shape[0]:
            logits = np.concatenate([logits, np.zeros((rows - logits.shape[0], self.num_labels), np.float32)])
        return InferOutput(logits=logits[:rows], model_version=str(version))

    async def ready(self) -> bool:
        """Return the configured readiness."""
        return self.is_ready

    async def max_batch_size(self, model: str) -> int | None:
        """Return the configured server-side limit."""
        return self.server_max_batch_size

    async def instance_count(self, model: str) -> int:
        """Return the configured instance count."""
        return self.server_instance_count

    async def aclose(self) -> None:
        """Mark closed."""
        self.closed = True


def write_fake_repository(
    root: Path,
    tokenizer_json: Path,
    *,
    labels: Sequence[str] = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
    variants: Sequence[str] = ("int8", "fp16"),
    max_length: int = 64,
    version: int = 1,
    model_name_prefix: str = "classifier",
) -> Path:
    """Write the gateway's share of a model repository (labels.json + tokenizer.json, no model) for the fake backend.

    Args:
        root: Repository root to create.
        tokenizer_json: A tokenizer.json to copy into every version directory.
        labels: Class names.
        variants: Variants to create.
        max_length: Truncation length written to labels.json.
        version: Version directory name.
        model_name_prefix: Model names are ``<prefix>_<variant>``.

    Returns:
        ``root``.
    """
    for variant in variants:
        name = contract.model_name(variant, model_name_prefix)
        vdir = contract.version_dir(root, name, version)
        vdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer_json, vdir / contract.TOKENIZER_FILE)
        contract.write_labels(
            vdir,
            contract.LabelsFile(
                labels=tuple(labels), max_length=max_length, variant=variant, model_name=name, version=version
            ),
        )
    return root
