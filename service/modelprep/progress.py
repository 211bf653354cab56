"""Progress that tells the truth: one line per stage (with its ETA) and per epoch; bars only when asked for.

``--quiet`` keeps every line and drops the bars, so a long build never goes silent. An ETA is either measured
(the rate of the steps done so far) or an estimate that says what it rests on (an earlier build of the same stage,
or the model's size).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable


def fmt_seconds(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = max(0.0, float(s))
    if s < 90:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int((s % 3600) // 60):02d} min"


class Progress:
    """Prints ``[modelprep] ...`` lines; wraps loops in tqdm bars when ``bars`` is on.

    Args:
        bars: show progress bars (off with ``--quiet``).
        stream: where lines go (stdout by default).
        prefix: the tag of every line.
    """

    def __init__(self, bars: bool = True, stream=None, prefix: str = "[modelprep]") -> None:
        self.bars = bars
        if not bars:
            # transformers draws its own bars (loading weights) unless the hub's switch is off; read at import
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        self.stream = stream or sys.stdout
        self.prefix = prefix
        self.t0 = time.perf_counter()

    def line(self, msg: str) -> None:
        """One line, flushed at once (a log reader sees it immediately)."""
        print(f"{self.prefix} {msg}", file=self.stream, flush=True)

    def stage(self, name: str, eta_seconds: float | None, basis: str, detail: str = "") -> None:
        """The line that opens a stage: what it does and roughly how long it takes."""
        eta = f"ETA ~{fmt_seconds(eta_seconds)} ({basis})" if eta_seconds is not None else f"ETA {basis}"
        self.line(f"{name}: {detail + '; ' if detail else ''}{eta}")

    def cached(self, name: str, seconds: float | None) -> None:
        built = f" (built in {fmt_seconds(seconds)})" if seconds is not None else ""
        self.line(f"{name}: up to date, reused{built}")

    def bar(self, it: Iterable, total: int | None = None, desc: str = "", unit: str = "it"):
        """``it`` wrapped in a tqdm bar, or ``it`` itself without bars."""
        if not self.bars:
            return _NoBar(it)
        from tqdm.auto import tqdm

        return tqdm(it, total=total, desc=desc, unit=unit, leave=False)


class _NoBar:
    """The parts of a tqdm bar the loops use, doing nothing."""

    def __init__(self, it: Iterable) -> None:
        self._it = it

    def __iter__(self):
        return iter(self._it)

    def set_postfix(self, **_: object) -> None:
        pass

    def update(self, _: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


#: A Progress that prints nothing (library use and tests).
class Silent(Progress):
    def __init__(self) -> None:
        super().__init__(bars=False)

    def line(self, msg: str) -> None:
        pass
