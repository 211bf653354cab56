"""The bounded request queue of one variant: entries, admission control and the wake-up signal.

``put_many`` either admits all items of a request or none (a request is never half-queued) and raises
:class:`Overloaded` at once when there is no room, as TEI's ``try_acquire_permit`` does; nothing waits for space.
Room is counted in *live* entries: an entry whose client went away or whose deadline passed no longer holds room,
but only the batcher's loop task removes it (admission never edits the queue behind the loop's back), and admission
wakes the loop when it saw such entries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.gateway.errors import Overloaded


@dataclass(eq=False)
class Entry:
    """One item (a text, already prepared by the model adapter) waiting for inference.

    Attributes:
        item: What the model adapter's ``process`` receives (opaque to the batching package).
        length: Exact token count of the item, for length bucketing and the token budget.
        future: Resolved by the batcher with the text's result or an error; cancelled by the route when the
            client disconnects or the deadline fires.
        enqueued_at: Monotonic time of admission (seconds).
        deadline: Monotonic time after which the entry is dropped with DeadlineExceeded (seconds).
        taken_at: Monotonic time the entry left the queue in a batch (set by the batcher).
    """

    item: Any
    length: int
    future: asyncio.Future[Any]
    enqueued_at: float
    deadline: float
    taken_at: float | None = field(default=None)

    @property
    def cancelled(self) -> bool:
        """Whether the waiting route gave up on this entry."""
        return self.future.cancelled()

    def dead(self, now: float) -> bool:
        """Whether the entry no longer needs an answer (cancelled, or past its deadline)."""
        return self.deadline <= now or self.future.cancelled()


class RequestQueue:
    """A bounded FIFO of entries with an event that fires on every change.

    Args:
        max_size: Most entries held at once.
        retry_after_seconds: Retry-After value of the Overloaded error raised when full.
        on_depth: Called with the new depth after every change (feeds the queue-depth gauge).
    """

    def __init__(
        self, max_size: int, *, retry_after_seconds: int, on_depth: Callable[[int], None] | None = None
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self._retry_after_seconds = retry_after_seconds
        self._entries: list[Entry] = []
        self._tokens = 0
        self._changed = asyncio.Event()
        self._on_depth = on_depth

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        """Sum of the queued entries' token counts (dead ones not yet removed included), for drain predictions."""
        return self._tokens

    @property
    def free(self) -> int:
        """Room left for new entries."""
        return self.max_size - len(self._entries)

    def live_count(self, now: float) -> int:
        """Entries that still need an answer (an O(n) scan; admission calls it only when the queue looks full)."""
        return sum(1 for e in self._entries if not e.dead(now))

    def put_many(self, entries: Sequence[Entry], *, now: float) -> None:
        """Admit all entries or none.

        Args:
            entries: The entries of one request.
            now: Monotonic time, to tell dead entries (which hold no room) from live ones.

        Raises:
            Overloaded: When the entries do not fit beside the live entries.
        """
        if len(entries) > self.free:
            live = self.live_count(now)
            if len(entries) > self.max_size - live:
                raise Overloaded(
                    f"queue full ({live} of {self.max_size} texts waiting); retry later",
                    retry_after_seconds=self._retry_after_seconds,
                )
            # Dead entries make room; the loop task removes them (it is woken by the notify below).
        self._entries.extend(entries)
        self._tokens += sum(e.length for e in entries)
        self._notify()

    def snapshot(self) -> list[Entry]:
        """Return the queued entries in arrival order (a copy)."""
        return list(self._entries)

    def replace(self, entries: Iterable[Entry]) -> None:
        """Replace the queue content with ``entries`` (the policy's ``rest``), keeping their order.

        Args:
            entries: The entries that stay queued.
        """
        self._entries = list(entries)
        self._tokens = sum(e.length for e in self._entries)
        self._notify()

    def clear_changed(self) -> None:
        """Reset the change signal before re-evaluating the queue."""
        self._changed.clear()

    async def wait_changed(self, timeout: float | None) -> bool:
        """Wait until the queue changes or ``timeout`` seconds pass.

        Args:
            timeout: Seconds to wait at most; None waits for the next change.

        Returns:
            True if the queue changed, False on timeout.
        """
        if timeout is None:
            await self._changed.wait()
            return True
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:  # an alias of TimeoutError from 3.11 on
            return False
        return True

    def wake(self) -> None:
        """Wake the waiter without a change (used to stop the batcher)."""
        self._changed.set()

    def _notify(self) -> None:
        self._changed.set()
        if self._on_depth is not None:
            self._on_depth(len(self._entries))
