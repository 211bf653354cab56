"""Staged load shapes for locust: ramp, steady and spike, picked with ``--shape`` (or ``LOCUST_SHAPE``).

Load it next to the locustfile, which registers the ``--shape`` option::

    locust -f loadtest/locustfile.py,loadtest/shapes.py --headless -u 32 -t 2m --shape spike

The shape reuses locust's own options (``use_common_options``): ``-u`` is the peak number of users and ``-t`` the
length of the whole run, so one pair of numbers scales every stage. Without ``-t`` a run lasts
``DEFAULT_RUN_SECONDS``; a shape always ends (``tick`` returns ``None``), so no run is unbounded.

Stages, as fractions of the run time and of the peak:

    ramp    20 % -> 40 % -> 60 % -> 80 % -> 100 % of the peak, five equal steps (where does latency bend?)
    steady  reach the peak within the first 10 % of the run, then hold it (the figures to quote)
    spike   25 % of the peak, the full peak from 40 % to 60 % of the run, then 25 % again (is load shed, and
            does the service recover when the burst ends?)
"""

from __future__ import annotations

from dataclasses import dataclass

from locust import LoadTestShape

DEFAULT_RUN_SECONDS = 120.0
DEFAULT_PEAK_USERS = 16


@dataclass(frozen=True)
class Stage:
    """One stage of a shape.

    Attributes:
        until: End of the stage as a fraction of the run time (0 < until <= 1).
        users: Target users as a fraction of the peak.
        spawn_seconds: How long reaching the target may take, as a fraction of the run time; ``None`` means
            "as fast as possible" (within about a second), which is what a spike needs.
    """

    until: float
    users: float
    spawn_seconds: float | None = None


SHAPES: dict[str, tuple[Stage, ...]] = {
    "ramp": tuple(Stage(until=(i + 1) / 5, users=(i + 1) / 5) for i in range(5)),
    "steady": (Stage(until=1.0, users=1.0, spawn_seconds=0.1),),
    "spike": (Stage(until=0.4, users=0.25), Stage(until=0.6, users=1.0), Stage(until=1.0, users=0.25)),
    # Bursts: short jumps to several times the base load, the shape that SLO-aware admission exists for. Under
    # each burst the gateway keeps admitted requests near the SLO and answers the excess 429 with a computed
    # Retry-After (shown apart as "shed: 429"); between bursts everything is admitted again.
    "burst": (
        Stage(until=0.2, users=0.2),
        Stage(until=0.3, users=1.0),
        Stage(until=0.5, users=0.2),
        Stage(until=0.6, users=1.0),
        Stage(until=0.8, users=0.2),
        Stage(until=0.9, users=1.0),
        Stage(until=1.0, users=0.2),
    ),
}


def target(shape: str, elapsed_seconds: float, run_seconds: float, peak_users: int) -> tuple[int, float] | None:
    """The (users, spawn rate) a shape asks for at a moment of the run.

    Args:
        shape: A key of ``SHAPES``.
        elapsed_seconds: Time since the run started.
        run_seconds: Length of the whole run.
        peak_users: Users at the shape's peak.

    Returns:
        ``(users, spawn_rate)``, or ``None`` once the run is over (locust then stops it).

    Raises:
        KeyError: Unknown shape.
    """
    stages = SHAPES[shape]
    if elapsed_seconds >= run_seconds:
        return None
    fraction = elapsed_seconds / run_seconds
    stage = next(s for s in stages if fraction < s.until)
    users = max(1, round(stage.users * peak_users))
    if stage.spawn_seconds is None:
        rate = float(max(1, peak_users))
    else:
        rate = max(1.0, users / max(stage.spawn_seconds * run_seconds, 1e-9))
    return users, rate


class StagedShape(LoadTestShape):
    """The shape named by ``--shape``, scaled by ``-u`` (peak users) and ``-t`` (run time)."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        """Called by locust about once a second.

        Returns:
            ``(users, spawn_rate)`` for now, or ``None`` to end the run.
        """
        options = self.runner.environment.parsed_options if self.runner else None
        shape = getattr(options, "shape", None) or "steady"
        run_seconds = float(getattr(options, "run_time", None) or DEFAULT_RUN_SECONDS)
        peak = int(getattr(options, "num_users", None) or DEFAULT_PEAK_USERS)
        return target(shape, self.get_run_time(), run_seconds, peak)
