"""The one cache of the build: every stage writes into ``workdir/<stage>/`` with a ``stage.key`` stamp.

A stage's key hashes everything it depends on (its config and the keys of the stages it reads). A re-run whose key
still matches reuses the directory; anything else rebuilds it from scratch. Stages whose product lives outside the
workdir (publishing into the model repository) pass a ``valid`` check so a deleted or replaced output is rebuilt
even when the stamp matches. ``timings.json`` remembers how long each stage took when last built, whatever its key:
that is the ETA of the next build of the stage.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .progress import Progress, Silent


class StageCache:
    """Runs stages once per key under ``workdir``.

    Args:
        workdir: the build's work directory.
        force: rebuild every stage whatever its key.
        progress: where stage lines go.
    """

    def __init__(self, workdir: Path, force: bool = False, progress: Progress | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.force = force
        self.progress = progress or Silent()
        self.reused: list[str] = []
        self.built: list[str] = []
        #: seconds each stage took when it was (last) built, reused or not
        self.seconds: dict[str, float] = {}
        self._timings_path = self.workdir / "timings.json"
        try:
            self._timings: dict[str, float] = json.loads(self._timings_path.read_text())
        except (OSError, ValueError):
            self._timings = {}

    def path(self, name: str) -> Path:
        return self.workdir / name

    def is_current(self, name: str, key: str, valid: Callable[[], bool] | None = None) -> bool:
        stamp = self.path(name) / "stage.key"
        if self.force or not stamp.is_file() or stamp.read_text().strip() != key:
            return False
        return valid() if valid is not None else True

    def last_seconds(self, name: str) -> float | None:
        """How long the stage took when it was last built (any key), if ever."""
        v = self._timings.get(name)
        return float(v) if v is not None else None

    def run(
        self,
        name: str,
        key: str,
        fn: Callable[[Path], object],
        *,
        eta: tuple[float | None, str] | None = None,
        detail: str = "",
        valid: Callable[[], bool] | None = None,
    ) -> Path:
        """Reuse ``workdir/name`` if its key matches, else rebuild it with ``fn(dir)``.

        Args:
            name: stage name (a relative path: ``int8/int8-dyn-pc-sym`` nests).
            key: hash of everything the stage depends on.
            fn: builds the stage into the (fresh, empty) directory it is given.
            eta: (seconds or None, what the estimate rests on), used when no earlier build timed this stage.
            detail: what the stage does, for its opening line.
            valid: extra check that the stage's outside product still exists.

        Returns:
            The stage directory.
        """
        d = self.path(name)
        if self.is_current(name, key, valid):
            self.reused.append(name)
            try:
                self.seconds[name] = float((d / "stage.seconds").read_text())
            except (OSError, ValueError):
                pass
            self.progress.cached(name, self.seconds.get(name))
            return d
        prior = self.last_seconds(name)
        if prior is not None:
            self.progress.stage(name, prior, "as long as its last build here", detail)
        elif eta is not None:
            self.progress.stage(name, eta[0], eta[1], detail)
        else:
            self.progress.stage(name, None, "unknown", detail)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        t0 = time.perf_counter()
        fn(d)
        self.seconds[name] = time.perf_counter() - t0
        (d / "stage.seconds").write_text(f"{self.seconds[name]:.1f}")
        (d / "stage.key").write_text(key)
        self.built.append(name)
        self._timings[name] = round(self.seconds[name], 1)
        self._timings_path.write_text(json.dumps(self._timings, indent=2, sort_keys=True))
        return d
