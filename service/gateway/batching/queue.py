"""The bounded request queue of one variant: entries, admission control and the wake-up signal.

``put_many`` either admits all texts of a request or none (a request is never half-queued) and raises
:class:`Overloaded` at once when there is no room, as TEI's ``try_acquire_permit`` does; nothing waits for space.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.gateway.errors import Overloaded


@dataclass(eq=False)
class Entry:
    """One text waiting for inference.

    Attributes:
        text: The input text.
        length: Estimated token count, used for length bucketing.
        future: Resolved by the batcher with the text's result or an error; cancelled by the route when the
            client disconnects or the deadline fires.
        enqueued_at: Monotonic time of admission (seconds).
        deadline: Monotonic time after which the entry is dropped with DeadlineExceeded (seconds).
        taken_at: Monotonic time the entry left the queue in a batch (set by the batcher).
    """

    text: str
    length: int
    future: asyncio.Future[Any]
    enqueued_at: float
    deadline: float
    taken_at: float | None = field(default=None)

    @property
    def cancelled(self) -> bool:
        """Whether the waiting route gave up on this entry."""
        return self.future.cancelled()


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
        self._changed = asyncio.Event()
        self._on_depth = on_depth

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def free(self) -> int:
        """Room left for new entries."""
        return self.max_size - len(self._entries)

    def put_many(self, entries: Sequence[Entry], *, purge: Callable[[], None] | None = None) -> None:
        """Admit all entries or none.

        Args:
            entries: The entries of one request.
            purge: Called once when the queue looks full, to remove dead entries (cancelled or expired) that still
                hold room; admission is re-checked afterwards.

        Raises:
            Overloaded: When the entries do not fit.
        """
        if len(entries) > self.free and purge is not None:
            purge()
        if len(entries) > self.free:
            raise Overloaded(
                f"queue full ({len(self._entries)} of {self.max_size} texts waiting); retry later",
                retry_after_seconds=self._retry_after_seconds,
            )
        self._entries.extend(entries)
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
