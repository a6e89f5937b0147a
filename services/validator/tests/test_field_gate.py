"""The field gate's arithmetic: the field's figure x the host ratio candidate / regressed variant,
judged against the budget the field broke, in the metric's own sense."""

from __future__ import annotations

from typing import Any

import pytest

from slmops.events.payloads import FieldEvidence
from slmops_validator.checks.field import field_gate, memory_ratio, timed_ratio
from slmops_validator.checks.noise import RatioEstimate


def _evidence(metric: str, *, bound: str = "max", budget: float, field: float) -> FieldEvidence:
    return FieldEvidence(detection_id="det-1", device_class="edge-arm", variant_id="v-old",
                         metric=metric, bound=bound,  # type: ignore[arg-type]
                         budget=budget, field_value=field)  # fmt: skip


def _ratio(r: float) -> RatioEstimate:
    return RatioEstimate(r, r * 0.95, r * 1.05, 40)


def test_the_prediction_is_the_field_value_scaled_by_the_host_ratio() -> None:
    evidence = _evidence("latency_p95_ms", budget=100.0, field=150.0)

    passing = field_gate(evidence, _ratio(0.6), "p95 latency p95")
    missing = field_gate(evidence, _ratio(0.8), "p95 latency p95")

    assert passing.name == "field.latency_p95_ms"
    assert passing.value == pytest.approx(90.0)
    assert (passing.budget, passing.bound, passing.unit) == (100.0, "max", "ms")
    assert passing.passed is True
    assert "field 150 ms x host ratio 0.600 = predicted 90 ms" in passing.detail
    assert "regressed variant v-old" in passing.detail
    assert missing.value == pytest.approx(120.0)
    assert missing.passed is False  # every host gate may pass: the field's budget is missed


def test_a_rate_is_a_floor_and_its_ratio_is_the_inverse_of_the_time_per_token() -> None:
    # the candidate takes 20 ms a token where the regressed variant took 30: 1.5x the rate
    speed = {"candidate_tpot_ms": [20.0] * 8, "reference_tpot_ms": [30.0] * 8,
             "candidate_ttft_ms": [50.0] * 8, "reference_ttft_ms": [40.0] * 8,
             "new_tokens": 16}  # fmt: skip
    ratio, what = timed_ratio("decode_tokens_per_s", {"speed": speed})
    evidence = _evidence("decode_tokens_per_s", bound="min", budget=12.0, field=10.0)

    gate = field_gate(evidence, ratio, what)

    assert ratio.ratio == pytest.approx(1.5)
    assert gate.value == pytest.approx(15.0)
    assert (gate.bound, gate.passed) == ("min", True)
    slower = field_gate(evidence, RatioEstimate(1.1, 1.0, 1.2, 8), what)
    assert slower.value == pytest.approx(11.0)
    assert slower.passed is False  # 11 tokens/s < the 12 the class needs


def test_timed_ratios_per_metric_from_the_probes_figures() -> None:
    pairs: dict[str, Any] = {"candidate_ms": [8.0] * 30, "reference_ms": [10.0] * 30}
    ratio, what = timed_ratio("latency_p95_ms", {"latency": pairs})
    assert ratio.ratio == pytest.approx(0.8)
    assert what == "p95 latency p95"

    speed = {"candidate_ttft_ms": [60.0] * 8, "reference_ttft_ms": [40.0] * 8,
             "candidate_tpot_ms": [10.0] * 8, "reference_tpot_ms": [10.0] * 8,
             "new_tokens": 5}  # fmt: skip
    ttft, what = timed_ratio("ttft_p95_ms", {"speed": speed})
    assert ttft.ratio == pytest.approx(1.5)
    assert "median (too few pairs for a p95)" in what
    request, _ = timed_ratio("latency_p95_ms", {"speed": speed})  # a decoder's whole request
    assert request.ratio == pytest.approx((60 + 4 * 10) / (40 + 4 * 10))
    with pytest.raises(ValueError, match="measured no ttft_p95_ms"):
        timed_ratio("ttft_p95_ms", {"latency": pairs})  # an encoder has no first token


def test_memory_ratio_is_of_rss_growth_or_else_of_artifact_sizes_and_says_which() -> None:
    rss, what = memory_ratio(40.0, 80.0, 100, 400)
    assert rss.ratio == pytest.approx(0.5)
    assert "peak RSS growth" in what

    sizes, what = memory_ratio(40.0, 0.0, 100, 400)
    assert sizes.ratio == pytest.approx(0.25)
    assert "artifact size" in what
    gate = field_gate(_evidence("peak_memory_mb", budget=300.0, field=1000.0), sizes, what)
    assert gate.value == pytest.approx(250.0)
    assert gate.passed is True
    assert gate.unit == "MB"
