"""The service-time model of one variant: how long a batch takes, learned online from the gateway's own batches.

A batch of ``rows`` texts padded to ``seq`` tokens costs about ``intercept + per_token * rows * seq`` seconds on a
transformer encoder (the fixed part is the call, the framework and the kernel launches; the rest grows with the
padded tokens). Both coefficients are fitted by recursive least squares with exponential forgetting, so the model
follows the backend as it warms up, as the machine gets busier, or after a model update, and needs no calibration
run. Clockwork (OSDI '20) and Nexus (SOSP '19) rely on the same observation: inference times are predictable enough
to schedule by.

Pure arithmetic: no asyncio, no I/O, an explicit clock-free API; the batcher feeds it and reads predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Observations before predictions are trusted; until then admission falls back to the count bound alone.
MIN_SAMPLES = 8
#: Diagonal of the RLS matrix before any data (intercept, per-token); also its upper bound.
P_PRIOR = (1.0, 1e-6)


@dataclass(frozen=True)
class ServiceTimeSnapshot:
    """What the model believes now (exported as metrics and in ``/v1/models``).

    Attributes:
        intercept_seconds: Fixed cost of one batch.
        per_token_seconds: Cost of one padded token.
        samples: Batches observed.
        ready: Whether predictions are used for admission.
    """

    intercept_seconds: float
    per_token_seconds: float
    samples: int
    ready: bool


def _cap_uncertainty(p: list[list[float]]) -> list[list[float]]:
    """Clamp the eigenvalues of the RLS matrix, in the prior's units, to at most the prior's (1)."""
    r = math.sqrt(P_PRIOR[1] / P_PRIOR[0])  # per-token units -> intercept units
    a, b, d = p[0][0] / P_PRIOR[0], p[0][1] / (P_PRIOR[0] * r), p[1][1] / P_PRIOR[1]
    mean, diff = (a + d) / 2, math.hypot((a - d) / 2, b)
    high, low = mean + diff, mean - diff
    if high <= 1.0:
        return p
    # eigenvector of the high eigenvalue, then rebuild with it clamped to 1 (the low one is kept, also <= 1)
    vx, vy = (b, high - a) if abs(b) > 1e-300 else ((1.0, 0.0) if a >= d else (0.0, 1.0))
    n = math.hypot(vx, vy)
    vx, vy = vx / n, vy / n
    low = min(low, 1.0)
    a2 = vx * vx * 1.0 + vy * vy * low
    b2 = vx * vy * (1.0 - low)
    d2 = vy * vy * 1.0 + vx * vx * low
    return [
        [a2 * P_PRIOR[0], b2 * P_PRIOR[0] * r],
        [b2 * P_PRIOR[0] * r, d2 * P_PRIOR[1]],
    ]


class ServiceTimeModel:
    """Online linear model ``seconds = intercept + per_token * padded_tokens``.

    Args:
        forgetting: Weight of the past per observation (0.98: the last ~50 batches dominate).
        prior_intercept_seconds: Intercept before any observation.
        prior_per_token_seconds: Per-token cost before any observation.
    """

    def __init__(
        self,
        *,
        forgetting: float = 0.98,
        prior_intercept_seconds: float = 0.002,
        prior_per_token_seconds: float = 2e-6,
    ) -> None:
        if not 0.5 <= forgetting <= 1.0:
            raise ValueError(f"forgetting must be in [0.5, 1], got {forgetting}")
        self._lam = forgetting
        self._theta = [prior_intercept_seconds, prior_per_token_seconds]
        # Inverse-covariance-like matrix of RLS; large = the priors are weak. Token counts are large numbers, so
        # the slope's entry is scaled down to keep the update well conditioned.
        self._p = [[P_PRIOR[0], 0.0], [0.0, P_PRIOR[1]]]
        self.samples = 0

    def observe(self, rows: int, seq: int, seconds: float) -> None:
        """Learn from one finished batch.

        Args:
            rows: Texts in the batch.
            seq: Padded sequence length.
            seconds: Measured time of the backend call.
        """
        if rows < 1 or seq < 1 or not math.isfinite(seconds) or seconds <= 0:
            return
        x = (1.0, float(rows * seq))
        p = self._p
        px = (p[0][0] * x[0] + p[0][1] * x[1], p[1][0] * x[0] + p[1][1] * x[1])
        denom = self._lam + x[0] * px[0] + x[1] * px[1]
        gain = (px[0] / denom, px[1] / denom)
        error = seconds - (self._theta[0] * x[0] + self._theta[1] * x[1])
        self._theta = [self._theta[0] + gain[0] * error, self._theta[1] + gain[1] * error]
        xp = (x[0] * p[0][0] + x[1] * p[1][0], x[0] * p[0][1] + x[1] * p[1][1])
        self._p = [
            [(p[0][0] - gain[0] * xp[0]) / self._lam, (p[0][1] - gain[0] * xp[1]) / self._lam],
            [(p[1][0] - gain[1] * xp[0]) / self._lam, (p[1][1] - gain[1] * xp[1]) / self._lam],
        ]
        # Batches of one size excite one direction only; forgetting then inflates the other without bound
        # (covariance wind-up: after 1,000 equal batches one odd sample swung the fit by 10x). The uncertainty in
        # every direction is capped at the prior's, so the model never becomes less certain than before any data,
        # while the directions the data does excite keep adapting at the forgetting factor's pace.
        self._p = _cap_uncertainty(self._p)
        # Costs are never negative: a noisy fit that drifts below zero is clamped (the prediction stays sane).
        self._theta = [max(0.0, self._theta[0]), max(0.0, self._theta[1])]
        self.samples += 1

    @property
    def ready(self) -> bool:
        """Whether enough batches were observed to predict."""
        return self.samples >= MIN_SAMPLES

    def predict(self, rows: int, seq: int) -> float:
        """Predicted seconds of one batch of ``rows`` texts padded to ``seq`` tokens."""
        return self._theta[0] + self._theta[1] * rows * seq

    def predict_tokens(self, batches: int, padded_tokens: int) -> float:
        """Predicted seconds of ``batches`` batches holding ``padded_tokens`` padded tokens in all."""
        return batches * self._theta[0] + self._theta[1] * padded_tokens

    def snapshot(self) -> ServiceTimeSnapshot:
        """The current coefficients."""
        return ServiceTimeSnapshot(self._theta[0], self._theta[1], self.samples, self.ready)
