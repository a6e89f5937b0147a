"""Latency histograms: quantiles within accuracy, merging equals pooling, small on the wire."""

from __future__ import annotations

import numpy as np
import pytest

from slmops.telemetry.sketch import ALPHA, MAX_BUCKETS, LogHistogram, Sketch


def _true_quantile(values: np.ndarray, q: float) -> float:
    return float(np.sort(values)[int(q * (len(values) - 1))])


@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
def test_quantiles_are_within_the_relative_accuracy(q: float) -> None:
    values = np.random.default_rng(1).lognormal(mean=3.0, sigma=1.0, size=20_000)

    estimate = Sketch.from_values(values).to_wire().quantile(q)

    assert estimate is not None
    assert abs(estimate - _true_quantile(values, q)) <= ALPHA * _true_quantile(values, q) * 1.01


def test_merging_gateways_equals_one_sketch_of_all_their_values() -> None:
    rng = np.random.default_rng(2)
    fast, slow = rng.normal(20, 2, 5_000).clip(0.1), rng.normal(200, 20, 500).clip(0.1)

    merged = Sketch.of(Sketch.from_values(fast).to_wire(), Sketch.from_values(slow).to_wire())
    pooled = Sketch.from_values(np.concatenate([fast, slow]))

    m, p = merged.to_wire(), pooled.to_wire()
    assert (m.offset, m.counts, m.zeros, m.min, m.max) == (
        p.offset,
        p.counts,
        p.zeros,
        p.min,
        p.max,
    )
    assert m.sum == pytest.approx(p.sum)
    assert merged.count == 5_500
    # the fleet p95 is the slow gateway's tail, which neither gateway's own p95 would give
    fleet_p95 = _true_quantile(np.concatenate([fast, slow]), 0.95)
    assert merged.quantile(0.95) == pytest.approx(fleet_p95, rel=ALPHA * 1.01)


def test_zeros_bad_values_and_empty_windows() -> None:
    sketch = Sketch.from_values([0.0, 0.0, float("nan"), -3.0, 5.0])

    assert sketch.count == 3
    assert sketch.zeros == 2
    assert sketch.quantile(0.5) == 0.0
    assert Sketch().to_wire().quantile(0.5) is None
    assert Sketch.of(None, LogHistogram()).count == 0


def test_a_huge_span_stays_bounded_and_keeps_its_tail() -> None:
    wire = Sketch.from_values([1e-2, 1.0, 1e3, 1e6, 1e9]).to_wire()

    assert len(wire.counts) <= MAX_BUCKETS
    assert wire.quantile(1.0) == pytest.approx(1e9, rel=ALPHA)
    assert LogHistogram.model_validate_json(wire.model_dump_json()) == wire


def test_a_busy_window_stays_small_on_the_wire() -> None:
    values = np.random.default_rng(3).lognormal(mean=4.0, sigma=0.7, size=100_000)

    assert len(Sketch.from_values(values).to_wire().model_dump_json()) < 2_000
