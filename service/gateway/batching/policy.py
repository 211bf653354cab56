"""The batching policy: pure functions that decide when to flush and what goes into the next batch.

No asyncio and no I/O here (TGI keeps its queue ``State`` apart from the async ``Queue`` the same way), so every
rule is tested with plain data and an explicit clock.

Rules:
- Dead entries are removed first: an entry whose deadline has passed is *expired* (it fails with 504), one whose
  future was cancelled (the client went away) is *cancelled*. A cancelled entry past its deadline counts as expired,
  because the route cancels entries itself when the deadline fires.
- Entries are grouped into length buckets by their estimated token count; a batch holds entries of one bucket
  only, so short texts are never padded to the length of long ones.
- A flush is due when the oldest live entry has waited ``max_wait_seconds`` (the timer starts at the *oldest*
  entry, as Ray's PR #36510 fixed), or when some bucket alone can fill a batch (``max_batch_size`` rows or
  ``max_batch_tokens`` padded tokens).
- The batch is anchored on the oldest live entry when its wait is over (no starvation), otherwise on the full
  bucket whose oldest entry is oldest. Within the bucket entries are taken in arrival order until the row limit or
  the padded-token budget would be exceeded. A batch never exceeds ``max_batch_size`` rows; the first entry is
  always taken even if it alone exceeds the token budget (it must be served and is truncated to max_length).
- With a service-time prediction, the batch is the largest arrival-order prefix whose predicted finish meets the
  earliest deadline in it (Clockwork's rule): a large batch that would make its most urgent text late is cut, the
  rest stays queued for the next batch. The first entry is always taken.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class PolicyEntry(Protocol):
    """What the policy needs to know about a queued entry."""

    @property
    def enqueued_at(self) -> float:
        """Monotonic time the entry was queued (seconds)."""

    @property
    def deadline(self) -> float:
        """Monotonic time after which the entry is worthless (seconds)."""

    @property
    def length(self) -> int:
        """Estimated token count of the entry's text."""

    @property
    def cancelled(self) -> bool:
        """Whether the waiting client gave up (its future was cancelled)."""


E = TypeVar("E", bound=PolicyEntry)


@dataclass(frozen=True)
class BatchLimits:
    """Limits of one batch.

    Attributes:
        max_batch_size: Most rows per batch.
        max_wait_seconds: Longest wait of the oldest entry before a partial batch is sent.
        max_batch_tokens: Padded-token budget (rows x longest estimated length).
        length_bucket_edges: Increasing upper edges of the length buckets (estimated tokens); lengths above the
            last edge share one final bucket.
    """

    max_batch_size: int
    max_wait_seconds: float
    max_batch_tokens: int
    length_bucket_edges: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_wait_seconds < 0:
            raise ValueError(f"max_wait_seconds must be >= 0, got {self.max_wait_seconds}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if list(self.length_bucket_edges) != sorted(set(self.length_bucket_edges)):
            raise ValueError(f"length_bucket_edges must be strictly increasing, got {self.length_bucket_edges}")


@dataclass
class BatchPlan(Generic[E]):
    """The outcome of :func:`take_batch`; every input entry is in exactly one list.

    Attributes:
        batch: Entries to send now, in arrival order.
        expired: Entries past their deadline (fail them with DeadlineExceeded).
        cancelled: Entries whose client went away (drop them).
        rest: Live entries that stay queued, in arrival order.
    """

    batch: list[E] = field(default_factory=list)
    expired: list[E] = field(default_factory=list)
    cancelled: list[E] = field(default_factory=list)
    rest: list[E] = field(default_factory=list)


def bucket_of(length: int, edges: Sequence[int]) -> int:
    """Return the index of the length bucket holding ``length``.

    Args:
        length: Estimated token count.
        edges: Increasing bucket upper edges.

    Returns:
        The index of the first edge >= ``length``, or ``len(edges)`` for the overflow bucket.
    """
    return bisect_left(edges, length)


def _split_dead(entries: Sequence[E], now: float) -> tuple[list[E], list[E], list[E]]:
    live: list[E] = []
    expired: list[E] = []
    cancelled: list[E] = []
    for e in entries:
        if e.deadline <= now:
            expired.append(e)
        elif e.cancelled:
            cancelled.append(e)
        else:
            live.append(e)
    return live, expired, cancelled


def _full_bucket(live: Sequence[E], limits: BatchLimits) -> int | None:
    """Return the bucket (in order of its oldest entry) that alone fills a batch, or None."""
    counts: dict[int, int] = {}
    longest: dict[int, int] = {}
    for e in live:
        b = bucket_of(e.length, limits.length_bucket_edges)
        counts[b] = counts.get(b, 0) + 1
        longest[b] = max(longest.get(b, 0), e.length)
        if counts[b] >= limits.max_batch_size or counts[b] * longest[b] >= limits.max_batch_tokens:
            return b
    return None


def flush_delay(entries: Sequence[E], limits: BatchLimits, now: float) -> float | None:
    """Say how long to wait before the next batch should be taken.

    Args:
        entries: Queued entries in arrival order.
        limits: Batch limits.
        now: Current monotonic time (seconds).

    Returns:
        ``None`` when nothing needs doing (no entries at all); ``0.0`` when a batch (or the removal of dead
        entries) is due now; otherwise the seconds until the oldest live entry's wait is over.
    """
    if not entries:
        return None
    live, expired, cancelled = _split_dead(entries, now)
    if expired or cancelled or not live:
        return 0.0  # dead entries hold queue capacity: remove them now
    wait_left = live[0].enqueued_at + limits.max_wait_seconds - now
    if wait_left <= 0 or _full_bucket(live, limits) is not None:
        return 0.0
    # Deadlines also wake the batcher, so an entry that expires while waiting is failed promptly.
    next_deadline = min(e.deadline for e in live) - now
    return max(0.0, min(wait_left, next_deadline))


def take_batch(
    entries: Sequence[E],
    limits: BatchLimits,
    now: float,
    predict: Callable[[int, int], float] | None = None,
) -> BatchPlan[E]:
    """Choose the next batch.

    Args:
        entries: Queued entries in arrival order.
        limits: Batch limits.
        now: Current monotonic time (seconds).
        predict: Predicted seconds of a batch of ``rows`` entries padded to ``longest`` tokens; when given, the
            batch is cut to the largest prefix that meets the earliest deadline in it.

    Returns:
        The plan: the batch to send, the expired and cancelled entries to drop, and the rest to keep queued.
        ``batch`` is empty only when there is no live entry.
    """
    live, expired, cancelled = _split_dead(entries, now)
    plan: BatchPlan[E] = BatchPlan(expired=expired, cancelled=cancelled)
    if not live:
        return plan
    edges = limits.length_bucket_edges
    anchor_bucket = bucket_of(live[0].length, edges)
    if live[0].enqueued_at + limits.max_wait_seconds > now:
        # The oldest may still wait: a full bucket, if any, is the reason we were called.
        full = _full_bucket(live, limits)
        if full is not None:
            anchor_bucket = full
    longest = 0
    for e in live:
        if len(plan.batch) < limits.max_batch_size and bucket_of(e.length, edges) == anchor_bucket:
            new_longest = max(longest, e.length)
            if not plan.batch or (len(plan.batch) + 1) * new_longest <= limits.max_batch_tokens:
                plan.batch.append(e)
                longest = new_longest
                continue
        plan.rest.append(e)
    if predict is not None and len(plan.batch) > 1:
        _cut_to_deadline(plan, now, predict)
    return plan


def _cut_to_deadline(plan: BatchPlan[E], now: float, predict: Callable[[int, int], float]) -> None:
    """Keep the largest prefix of ``plan.batch`` whose predicted finish meets its earliest deadline."""
    keep = 1
    longest = plan.batch[0].length
    earliest = plan.batch[0].deadline
    for k in range(2, len(plan.batch) + 1):
        e = plan.batch[k - 1]
        longest = max(longest, e.length)
        earliest = min(earliest, e.deadline)
        if now + predict(k, longest) > earliest:
            break
        keep = k
    if keep == len(plan.batch):
        return
    cut = plan.batch[keep:]
    del plan.batch[keep:]
    # Back into the queue in arrival order (a stable sort: texts of one request keep their order).
    plan.rest = sorted([*cut, *plan.rest], key=lambda e: e.enqueued_at)
