"""Timing gates that do not flip on noise: paired runs, a bootstrap interval, a clear verdict.

A candidate and its fp32 reference are timed in interleaved pairs on the same host. One p95
from 40 runs moves by 20 % between two runs on a shared 2-core machine, so a "no slower than
fp32" budget (ratio <= 1.0) judged on the point estimate passed one run and failed the next
(SmolLM2's only viable x86 variant, 1.2x once). Here the ratio carries a 95 % bootstrap
interval over the pairs, and the verdict is:

- ``confident pass``: the whole interval is within the budget;
- ``confident fail``: the whole interval is over it - the only way the gate fails;
- ``within noise``: the interval straddles the budget. The caller measures more pairs (up to
  its round limit); if it still straddles, the gate passes and says so: the measurement cannot
  tell the candidate from the budget, and failing a release on a coin toss is what this module
  exists to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Verdict = Literal["confident pass", "within noise", "confident fail"]
_RESAMPLES = 2000


@dataclass(frozen=True)
class RatioEstimate:
    """``statistic(candidate) / statistic(reference)`` with its 95 % interval."""

    ratio: float
    low: float
    high: float
    pairs: int

    def verdict(self, budget: float) -> Verdict:
        if self.high <= budget:
            return "confident pass"
        if self.low > budget:
            return "confident fail"
        return "within noise"

    def describe(self, budget: float | None) -> str:
        text = f"{self.ratio:.3f}x (95% CI {self.low:.3f}-{self.high:.3f}, {self.pairs} pairs)"
        return text if budget is None else f"{text}: {self.verdict(budget)} of {budget:g}x"


def paired_ratio(
    candidate: Sequence[float], reference: Sequence[float], *, quantile: float, seed: int = 0
) -> RatioEstimate:
    """The ratio of the two series' ``quantile`` (0.5 median, 0.95 p95), bootstrapped over
    the pairs (a pair shares the moment it ran, so host drift cancels)."""
    cand = np.asarray(candidate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if cand.size == 0 or cand.size != ref.size:
        raise ValueError("paired timings need the same, non-zero number of runs on each side")
    point = float(np.quantile(cand, quantile) / max(np.quantile(ref, quantile), 1e-12))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, cand.size, size=(_RESAMPLES, cand.size))
    ratios = np.quantile(cand[picks], quantile, axis=1) / np.maximum(
        np.quantile(ref[picks], quantile, axis=1), 1e-12
    )
    low, high = np.quantile(ratios, [0.025, 0.975])
    return RatioEstimate(point, float(low), float(high), int(cand.size))
