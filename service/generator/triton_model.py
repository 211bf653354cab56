"""Triton python-backend model of the generator: KV cache per sequence, continuous batching, streamed tokens.

Copied by ``service.generator.publish`` into every version directory as ``<model>/<version>/model.py``, beside
``model.onnx`` (one graph with a dynamic past, see ``service/generator/kvmodel.py``) and ``generation.json``.
Inside Triton it imports only numpy, onnxruntime and ``triton_python_backend_utils``.

How it works:

* The model is **decoupled** (``model_transaction_policy { decoupled: true }``): ``execute`` only validates each
  request and hands it to the :class:`Engine`, then returns at once; responses (one per generated token) are
  sent later from the engine thread through the request's response sender, the last one flagged FINAL.
* The engine thread runs **iteration-level (continuous) batching**, as Orca (OSDI '22) describes: every
  iteration it admits the sequences that arrived since the last one and runs their prompts (prefill, batched,
  left-padded), then runs **one** decode step for every sequence already running, as one batch. A new sequence
  therefore joins the running decode batch at the next iteration boundary, and a finished one leaves at once;
  nobody waits for a whole batch to end.
* Each sequence owns its **KV cache** (``[kv_heads, length, head_dim]`` per layer). A decode step left-pads the
  caches of the batch to the longest one (mask 0 on the padding), and takes each sequence's updated cache back
  out of the graph's ``present_*`` outputs.
* **Admission** reserves ``(prompt + max_new_tokens) x bytes_per_token`` of the ``max_kv_cache_bytes`` budget
  up front, so a running sequence is never evicted for room; when the budget (or ``max_active_sequences``) is
  full the request is refused at once with an ``overloaded:`` error (the gateway's 429).
* **Cancellation** (the client went away, or the gateway cancelled the stream at a stop string) is checked
  before every iteration; a cancelled sequence's cache and reservation are freed immediately.

Errors travel as messages that start with a code (``invalid_input:``, ``overloaded:``, ``unavailable:``,
``cancelled:``, ``internal:``): errors inside a gRPC stream carry only a message, no status code, so the code
has to be part of it. A bad request is answered alone and never stops the engine.

Every token response carries a trace of the engine state: ``step`` (iteration number), ``batch_size`` (sequences
in that step's batch), ``kv_cache_bytes`` and ``active_sequences``. A request with ``stats_only`` set gets one
response with the current totals (``evictions_total`` included).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:  # Only importable inside Triton's python backend stub.
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - the engine below is tested without Triton
    pb_utils = None

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - reported by initialize()
    ort = None

FINISH_LENGTH = "length"
FINISH_EOS = "eos"
DEFAULT_MAX_KV_CACHE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_ACTIVE_SEQUENCES = 16
DEFAULT_MAX_CONTEXT_TOKENS = 2048
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_INTRA_OP_THREADS = 2
# Bounds one prefill call: newcomers beyond it wait for the next iteration (keeps one step's latency bounded).
DEFAULT_MAX_PREFILL_TOKENS = 2048


class RequestError(Exception):
    """A request-level refusal; ``code`` is the message prefix the gateway maps to a status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class Event:
    """One streamed answer: a generated token, or the end of a sequence with an error.

    Attributes:
        token_id: The generated token (-1 with an error).
        step: Engine iteration that produced it.
        batch_size: Sequences in that iteration's batch (prefill or decode).
        kv_cache_bytes: Cache bytes in use after the step.
        active_sequences: Sequences holding a cache after the step.
        finish_reason: "" while running; "length" or "eos" on the last token.
        error: Set (and final) when the sequence ends in an error.
    """

    token_id: int
    step: int
    batch_size: int
    kv_cache_bytes: int
    active_sequences: int
    finish_reason: str = ""
    error: str | None = None

    @property
    def final(self) -> bool:
        """Whether this is the sequence's last event."""
        return bool(self.finish_reason) or self.error is not None


@dataclass
class SequenceState:
    """One running sequence (its cache lives here).

    Attributes:
        prompt: Prompt ids.
        max_new_tokens: Generation limit.
        temperature: 0 for greedy.
        top_p: Nucleus mass (1 = no cut).
        ignore_eos: Keep generating past the end-of-sequence token (benchmarks).
        emit: Delivers an event (Triton: sends a response).
        is_cancelled: Whether the client went away.
        reserved_bytes: Cache budget reserved at admission.
    """

    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    ignore_eos: bool
    emit: Callable[[Event], None]
    is_cancelled: Callable[[], bool]
    reserved_bytes: int
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    past: list[np.ndarray] = field(default_factory=list)
    length: int = 0
    generated: int = 0
    last_token: int = -1


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when ``temperature`` is 0, else temperature + nucleus (top-p) sampling with the sequence's RNG.

    Args:
        logits: ``[vocab]`` float scores.
        temperature: > 0 to sample.
        top_p: Keep the smallest set of tokens whose probability mass reaches ``top_p``.
        rng: The sequence's generator (seeded by the request's seed: reproducible).

    Returns:
        The chosen token id.
    """
    if temperature <= 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = int(np.searchsorted(cumulative, top_p) + 1)
        chosen = order[:keep]
        kept = probs[chosen] / probs[chosen].sum()
        return int(chosen[rng.choice(len(chosen), p=kept)])
    return int(rng.choice(len(probs), p=probs))


class Engine:
    """Continuous-batching decoder over an ONNX Runtime session with a past/present signature.

    Args:
        session: The ONNX Runtime session (or anything with ``run(None, feed)``).
        num_layers: Decoder layers (the graph has ``past_key_<i>``/``past_value_<i>`` inputs).
        kv_heads: Key/value heads.
        head_dim: Head width.
        cache_dtype: numpy dtype of the cache (float32 or float16).
        eos_token_ids: Tokens that end a sequence.
        max_kv_cache_bytes: Budget of reserved cache bytes over all sequences.
        max_active_sequences: Most sequences holding a cache (and in one decode batch).
        max_context_tokens: Longest prompt + max_new_tokens.
        max_new_tokens_limit: Largest max_new_tokens accepted.
        max_prefill_tokens: Most prompt tokens (padded) in one prefill call.
    """

    def __init__(
        self,
        session: Any,
        *,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        cache_dtype: Any = np.float32,
        eos_token_ids: Sequence[int] = (),
        max_kv_cache_bytes: int = DEFAULT_MAX_KV_CACHE_BYTES,
        max_active_sequences: int = DEFAULT_MAX_ACTIVE_SEQUENCES,
        max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
        max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
    ) -> None:
        self.session = session
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.cache_dtype = np.dtype(cache_dtype)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_kv_cache_bytes = max_kv_cache_bytes
        self.max_active_sequences = max_active_sequences
        self.max_context_tokens = max_context_tokens
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_prefill_tokens = max_prefill_tokens
        self.bytes_per_token = 2 * num_layers * kv_heads * head_dim * self.cache_dtype.itemsize
        self._past_names = [f"past_{k}_{i}" for i in range(num_layers) for k in ("key", "value")]
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[SequenceState] = []
        self._running: list[SequenceState] = []
        self._reserved_bytes = 0
        # Admitted and not yet released (pending, being prefilled, or running): what the limits count.
        self._admitted = 0
        self._stopping = False
        self.steps = 0
        self.evictions_total = 0
        self.refused_total = 0
        self.tokens_total = 0
        self._thread: threading.Thread | None = None

    # -- admission ---------------------------------------------------------------------------------------------

    def validate(self, prompt: Sequence[int], max_new_tokens: int, temperature: float, top_p: float) -> None:
        """Check one request's values.

        Raises:
            RequestError: ``invalid_input`` with the reason.
        """
        if len(prompt) == 0:
            raise RequestError("invalid_input", "empty prompt (input_ids has no tokens)")
        if not 1 <= max_new_tokens <= self.max_new_tokens_limit:
            raise RequestError(
                "invalid_input", f"max_new_tokens must be in [1, {self.max_new_tokens_limit}], got {max_new_tokens}"
            )
        if len(prompt) + max_new_tokens > self.max_context_tokens:
            raise RequestError(
                "invalid_input",
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                f"{self.max_context_tokens} tokens",
            )
        if not (np.isfinite(temperature) and 0.0 <= temperature <= 100.0):
            raise RequestError("invalid_input", f"temperature must be in [0, 100], got {temperature}")
        if not (np.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise RequestError("invalid_input", f"top_p must be in (0, 1], got {top_p}")

    def submit(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        emit: Callable[[Event], None],
        is_cancelled: Callable[[], bool] = lambda: False,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> SequenceState:
        """Validate and admit a sequence; it joins the running batch at the next iteration.

        Raises:
            RequestError: ``invalid_input`` for bad values (vocabulary range included), ``overloaded`` when the
                cache budget or the sequence limit is full, ``unavailable`` while stopping.
        """
        self.validate(prompt, max_new_tokens, temperature, top_p)
        ids = [int(t) for t in prompt]
        reserve = (len(ids) + max_new_tokens) * self.bytes_per_token
        if reserve > self.max_kv_cache_bytes:
            raise RequestError(
                "invalid_input",
                f"this request needs {reserve} bytes of KV cache; the whole budget is {self.max_kv_cache_bytes}",
            )
        seq = SequenceState(
            prompt=ids,
            max_new_tokens=max_new_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            ignore_eos=bool(ignore_eos),
            emit=emit,
            is_cancelled=is_cancelled,
            reserved_bytes=reserve,
            rng=np.random.default_rng(seed),
        )
        with self._wake:
            if self._stopping:
                raise RequestError("unavailable", "the model is unloading")
            active = self._admitted
            if active >= self.max_active_sequences or self._reserved_bytes + reserve > self.max_kv_cache_bytes:
                self.refused_total += 1
                raise RequestError(
                    "overloaded",
                    f"KV cache full ({self._reserved_bytes} of {self.max_kv_cache_bytes} bytes reserved, "
                    f"{active} of {self.max_active_sequences} sequences); retry later",
                )
            self._reserved_bytes += reserve
            self._admitted += 1
            self._pending.append(seq)
            self._wake.notify()
        return seq

    # -- state -------------------------------------------------------------------------------------------------

    def kv_cache_bytes(self) -> int:
        """Cache bytes actually held by running sequences (not the reservations)."""
        return sum(s.length for s in self._running) * self.bytes_per_token

    def stats(self) -> dict[str, int]:
        """Current totals (thread-safe)."""
        with self._lock:
            return {
                "kv_cache_bytes": self.kv_cache_bytes(),
                "kv_cache_reserved_bytes": self._reserved_bytes,
                "max_kv_cache_bytes": self.max_kv_cache_bytes,
                "active_sequences": self._admitted,
                "steps_total": self.steps,
                "evictions_total": self.evictions_total,
                "refused_total": self.refused_total,
                "tokens_total": self.tokens_total,
            }

    def _release(self, seq: SequenceState) -> None:
        # Caller holds the lock. Idempotent: a sequence is released once, whichever path ends it.
        if seq.reserved_bytes == 0:
            return
        self._reserved_bytes -= seq.reserved_bytes
        self._admitted -= 1
        seq.reserved_bytes = 0
        seq.past = []
        seq.length = 0

    # -- the loop ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="generator-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """Stop the loop and end every sequence with an ``unavailable`` error."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_seconds)
        with self._lock:
            left = self._pending + self._running
            self._pending, self._running = [], []
            for seq in left:
                self._release(seq)
        for seq in left:
            self._safe_emit(seq, self._event(-1, 0, error="unavailable: the model is unloading"))

    def run(self) -> None:
        """Iterate until stopped; sleeps on a condition (no polling) while nothing is running."""
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not self._running:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.iterate()
            except Exception as error:  # noqa: BLE001 - a broken step must fail its sequences, not the thread
                self._fail_all(f"internal: {type(error).__name__}: {error}")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            left = self._pending + self._running
            self._pending, self._running = [], []
            for seq in left:
                self._release(seq)
        for seq in left:
            self._safe_emit(seq, self._event(-1, 0, error=message))

    def _event(self, token: int, batch: int, finish: str = "", error: str | None = None) -> Event:
        return Event(
            token_id=token,
            step=self.steps,
            batch_size=batch,
            kv_cache_bytes=self.kv_cache_bytes(),
            active_sequences=self._admitted,
            finish_reason=finish,
            error=error,
        )

    @staticmethod
    def _safe_emit(seq: SequenceState, event: Event) -> bool:
        try:
            seq.emit(event)
            return True
        except Exception:  # noqa: BLE001 - a client that cannot be answered is treated as gone
            return False

    def iterate(self) -> None:
        """One iteration: drop cancelled sequences, prefill newcomers, one decode step for the others."""
        with self._lock:
            dropped = [s for s in self._running + self._pending if s.is_cancelled()]
            for seq in dropped:
                if seq in self._running:
                    self._running.remove(seq)
                else:
                    self._pending.remove(seq)
                self._release(seq)
                self.evictions_total += 1
            newcomers: list[SequenceState] = []
            budget = self.max_prefill_tokens
            while self._pending:
                width = max([len(s.prompt) for s in newcomers] + [len(self._pending[0].prompt)])
                if newcomers and width * (len(newcomers) + 1) > budget:
                    break
                newcomers.append(self._pending.pop(0))
            decoding = list(self._running)
        for seq in dropped:  # the request still needs its final response
            self._safe_emit(seq, self._event(-1, 0, error="cancelled: the request was cancelled"))
        if not newcomers and not decoding:
            return
        self.steps += 1
        if newcomers:
            self._prefill(newcomers)
        if decoding:
            self._decode(decoding)

    def _run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        feed.update(zip(self._past_names, past, strict=True))
        return self.session.run(None, feed)

    def _prefill(self, seqs: list[SequenceState]) -> None:
        width = max(len(s.prompt) for s in seqs)
        batch = len(seqs)
        ids = np.zeros((batch, width), dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        pos = np.zeros((batch, width), dtype=np.int64)
        for i, s in enumerate(seqs):  # left padding: the last column is every prompt's last token
            n = len(s.prompt)
            ids[i, width - n :] = s.prompt
            mask[i, width - n :] = 1
            pos[i, width - n :] = np.arange(n)
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.cache_dtype)
        try:
            out = self._run(ids, mask, pos, [empty] * (2 * self.num_layers))
        except Exception as error:  # noqa: BLE001 - e.g. a token id outside the vocabulary
            if batch > 1:  # isolate the culprit: each newcomer alone
                for s in seqs:
                    self._prefill([s])
                return
            with self._lock:
                self._release(seqs[0])
            self._safe_emit(seqs[0], self._event(-1, 1, error=f"invalid_input: the model rejected the prompt: {error}"))
            return
        logits, present = out[0], out[1:]
        for i, s in enumerate(seqs):
            n = len(s.prompt)
            s.past = [p[i, :, width - n :, :] for p in present]
            s.length = n
        with self._lock:
            self._running.extend(seqs)
        self._advance(seqs, np.asarray(logits[:, -1, :], dtype=np.float32), batch)

    def _decode(self, seqs: list[SequenceState]) -> None:
        width = max(s.length for s in seqs)
        batch = len(seqs)
        ids = np.asarray([[s.last_token] for s in seqs], dtype=np.int64)
        mask = np.zeros((batch, width + 1), dtype=np.int64)
        pos = np.asarray([[s.length] for s in seqs], dtype=np.int64)
        past = []
        for layer in range(2 * self.num_layers):
            buf = np.zeros((batch, self.kv_heads, width, self.head_dim), dtype=self.cache_dtype)
            for i, s in enumerate(seqs):
                buf[i, :, width - s.length :, :] = s.past[layer]
            past.append(buf)
        for i, s in enumerate(seqs):
            mask[i, width - s.length :] = 1
        out = self._run(ids, mask, pos, past)
        logits, present = out[0], out[1:]
        for i, s in enumerate(seqs):
            s.past = [p[i, :, width - s.length :, :] for p in present]
            s.length += 1
        self._advance(seqs, np.asarray(logits[:, -1, :], dtype=np.float32), batch)

    def _advance(self, seqs: list[SequenceState], logits: np.ndarray, batch: int) -> None:
        for i, s in enumerate(seqs):
            token = sample_token(logits[i], s.temperature, s.top_p, s.rng)
            s.last_token = token
            s.generated += 1
            self.tokens_total += 1
            finish = ""
            if token in self.eos_token_ids and not s.ignore_eos:
                finish = FINISH_EOS
            elif s.generated >= s.max_new_tokens:
                finish = FINISH_LENGTH
            if finish:
                with self._lock:
                    if s in self._running:
                        self._running.remove(s)
                    self._release(s)
            if not self._safe_emit(s, self._event(token, batch, finish)) and not finish:
                with self._lock:  # unreachable client: free its cache now
                    if s in self._running:
                        self._running.remove(s)
                        self._release(s)
                        self.evictions_total += 1


# ---------------------------------------------------------------------------------------------------------------
# Triton glue


#: Config parameters a deployment may override through the Triton container's environment (the chart's
#: ``generation.kvCache`` values): ``LORASERVE_GENERATOR_<KEY>``, e.g. ``LORASERVE_GENERATOR_MAX_KV_CACHE_BYTES``.
ENV_OVERRIDABLE = ("max_kv_cache_bytes", "max_active_sequences")
ENV_PREFIX = "LORASERVE_GENERATOR_"


def _parameter(config: dict[str, Any], key: str, default: int) -> int:
    raw = config.get("parameters", {}).get(key, {}).get("string_value", "")
    if key in ENV_OVERRIDABLE and os.environ.get(ENV_PREFIX + key.upper(), "").strip():
        raw = os.environ[ENV_PREFIX + key.upper()]
    if str(raw).strip() == "":
        return default
    value = int(raw)
    if value < 0:
        raise ValueError(f"config parameter {key!r} must be >= 0, got {value}")
    return value


def _scalar(request: Any, name: str, default: Any) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    array = tensor.as_numpy()
    if array.size != 1:
        raise RequestError("invalid_input", f"{name} must hold exactly one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0].item()


class TritonPythonModel:
    """Triton entry points: ``initialize`` loads the graph and starts the engine, ``execute`` admits requests."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load ``model.onnx`` and ``generation.json`` of the version directory and start the engine thread.

        Raises:
            RuntimeError: If onnxruntime or a file is missing, or the model is not decoupled.
        """
        if ort is None:
            raise RuntimeError("onnxruntime is not importable in Triton's python backend environment")
        config = json.loads(args["model_config"])
        self._name = config.get("name", "generator")
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise RuntimeError(f"{self._name}: the generator streams tokens; set model_transaction_policy.decoupled")
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        meta = json.loads((version_dir / "generation.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = _parameter(config, "intra_op_thread_count", DEFAULT_INTRA_OP_THREADS)
        options.inter_op_num_threads = 1
        # No busy-waiting ORT threads: the cores are shared with the gateway (see backend_model.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(
            str(version_dir / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.engine = Engine(
            session,
            num_layers=int(meta["num_layers"]),
            kv_heads=int(meta["num_kv_heads"]),
            head_dim=int(meta["head_dim"]),
            cache_dtype=np.float16 if meta.get("cache_dtype") == "float16" else np.float32,
            eos_token_ids=meta.get("eos_token_ids", []),
            max_kv_cache_bytes=_parameter(config, "max_kv_cache_bytes", DEFAULT_MAX_KV_CACHE_BYTES),
            max_active_sequences=_parameter(config, "max_active_sequences", DEFAULT_MAX_ACTIVE_SEQUENCES),
            max_context_tokens=min(
                _parameter(config, "max_context_tokens", DEFAULT_MAX_CONTEXT_TOKENS), int(meta["max_context_tokens"])
            ),
            max_new_tokens_limit=_parameter(config, "max_new_tokens_limit", DEFAULT_MAX_NEW_TOKENS),
            max_prefill_tokens=_parameter(config, "max_prefill_tokens", DEFAULT_MAX_PREFILL_TOKENS),
        )
        self._vocab_size = int(meta["vocab_size"])
        self.engine.start()
        pb_utils.Logger.log_info(
            f"{self._name}: engine started, {self.engine.bytes_per_token} cache bytes/token, budget "
            f"{self.engine.max_kv_cache_bytes} bytes, at most {self.engine.max_active_sequences} sequences"
        )

    def _response(self, event: Event) -> Any:
        if event.error is not None:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(event.error))
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("token_id", np.asarray([event.token_id], dtype=np.int64)),
                pb_utils.Tensor("step", np.asarray([event.step], dtype=np.int64)),
                pb_utils.Tensor("batch_size", np.asarray([event.batch_size], dtype=np.int32)),
                pb_utils.Tensor("kv_cache_bytes", np.asarray([event.kv_cache_bytes], dtype=np.int64)),
                pb_utils.Tensor("active_sequences", np.asarray([event.active_sequences], dtype=np.int32)),
                pb_utils.Tensor("finish_reason", np.asarray([event.finish_reason.encode()], dtype=np.object_)),
            ]
        )

    def _stats_response(self) -> Any:
        stats = self.engine.stats()
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("token_id", np.asarray([-1], dtype=np.int64)),
                pb_utils.Tensor("step", np.asarray([stats["steps_total"]], dtype=np.int64)),
                pb_utils.Tensor("batch_size", np.asarray([0], dtype=np.int32)),
                pb_utils.Tensor("kv_cache_bytes", np.asarray([stats["kv_cache_bytes"]], dtype=np.int64)),
                pb_utils.Tensor("active_sequences", np.asarray([stats["active_sequences"]], dtype=np.int32)),
                pb_utils.Tensor("finish_reason", np.asarray([json.dumps(stats).encode()], dtype=np.object_)),
            ]
        )

    def execute(self, requests: list[Any]) -> None:
        """Admit each request to the engine (or answer it with an error at once); responses stream later."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            try:
                if bool(_scalar(request, "stats_only", False)):
                    sender.send(self._stats_response(), flags=final)
                    continue
                ids_tensor = pb_utils.get_input_tensor_by_name(request, "input_ids")
                if ids_tensor is None:
                    raise RequestError("invalid_input", "input_ids is required")
                ids = ids_tensor.as_numpy()
                if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                    raise RequestError("invalid_input", f"input_ids must be 1-D integers, got {list(ids.shape)}")
                if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self._vocab_size):
                    raise RequestError("invalid_input", f"token ids must be in [0, {self._vocab_size})")
                seed = _scalar(request, "seed", -1)
                cancelled = getattr(sender, "is_cancelled", None) or getattr(request, "is_cancelled", None)

                def emit(event: Event, sender: Any = sender) -> None:
                    sender.send(self._response(event), flags=final if event.final else 0)

                self.engine.submit(
                    ids.tolist(),
                    max_new_tokens=int(_scalar(request, "max_new_tokens", 64)),
                    temperature=float(_scalar(request, "temperature", 0.0)),
                    top_p=float(_scalar(request, "top_p", 1.0)),
                    seed=None if int(seed) < 0 else int(seed),
                    ignore_eos=bool(_scalar(request, "ignore_eos", False)),
                    emit=emit,
                    is_cancelled=cancelled if cancelled is not None else (lambda: False),
                )
            except Exception as error:  # noqa: BLE001 - every refusal is answered to this request only
                message = str(error) if isinstance(error, RequestError) else f"invalid_input: {error}"
                try:
                    sender.send(
                        pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)), flags=final
                    )
                except Exception as send_error:  # noqa: BLE001 - the client is gone already
                    pb_utils.Logger.log_warn(f"{self._name}: could not answer a refused request: {send_error}")

    def finalize(self) -> None:
        """Stop the engine; unfinished sequences get an ``unavailable`` error."""
        started = time.monotonic()
        self.engine.stop()
        pb_utils.Logger.log_info(f"{self._name}: engine stopped in {time.monotonic() - started:.2f} s")
