"""Regressions after exactly the configured windows, none on a healthy fleet, drift from
aggregates only, nothing judged on too few samples, the host's figure beside the field's."""

from __future__ import annotations

import numpy as np
import pytest

from slmops.profiles import Budgets
from slmops.telemetry import DriftSignature, embedding_moments, token_logprobs
from slmops_telemetry.detect import DetectionSettings, FieldGates, find_drifts, find_regressions
from slmops_telemetry.expectations import Expectations, HostFigures
from slmops_telemetry.view import FleetView

PI5 = Budgets(max_size_mb=256, max_peak_memory_mb=1024, max_latency_p95_ms=250,
              max_ttft_ms=1500, min_decode_tokens_per_s=8)  # fmt: skip


def expect(
    host: dict[str, float | None] | None = None, baseline: DriftSignature | None = None
) -> dict[tuple[str, str], Expectations]:
    figures = HostFigures(host or {}, baseline, "sha256:" + "ab" * 32)
    return {("v-a", "arm64-pi5"): Expectations("v-a", "arm64-pi5", PI5, figures)}


def baseline(maker, n: int = 2000) -> DriftSignature:
    calm = maker.samples(requests=n)
    return DriftSignature(embedding=embedding_moments(calm.embeddings),
                          logprobs=token_logprobs(calm.logprobs.tolist()))  # fmt: skip


def test_a_slower_class_is_found_after_exactly_the_windows_required(maker) -> None:
    view, settings = FleetView(), DetectionSettings(windows_required=2)
    expectations = expect(host={"latency_p95_ms": None, "ttft_p95_ms": 410.0})
    found_at: dict[int, list[str]] = {}
    for window in range(8):
        slow = window >= 4  # the field is 15x slower than the host from window 4 on
        view.fold(maker.window(window, latency_ms=300.0 if slow else 20.0))
        findings = find_regressions(view, expectations, settings, now=maker.at(window + 1, 5))
        found_at[window] = [f.detection_id for f in findings]

    assert all(found_at[w] == [] for w in range(5))  # one slow window is not a regression
    assert len(found_at[5]) == 1
    assert found_at[6] == found_at[7] == found_at[5]  # the same ongoing regression
    (finding,) = find_regressions(view, expectations, settings, now=maker.at(6, 5))
    assert finding.metric == "latency_p95_ms"
    assert finding.bound == "max"
    assert finding.budget == 250.0
    assert [w.start.timestamp() for w in finding.windows] == [maker.at(4, 0), maker.at(5, 0)]
    assert all(w.value is not None and w.value > 250.0 for w in finding.windows)
    assert finding.field_value > 250.0
    assert finding.host_value is None  # not measurable on the validator's host
    assert (finding.model_name, finding.version, finding.labels) == ("m", "1.0.0", {})


def test_a_healthy_noisy_fleet_gives_no_findings_over_50_windows(maker) -> None:
    view, settings = FleetView(), DetectionSettings()
    expectations = expect(baseline=baseline(maker))
    false_positives = 0
    for window in range(50):
        # noisy but healthy: a wide latency spread (p95 ~2.3x the median), a few errors, one
        # gateway far slower than the rest, the same input distribution as the evaluation set
        view.fold(maker.window(window, gateways=12, latency_ms=50.0, sigma=0.5, errors=1))
        odd = maker.samples(requests=10, latency_ms=900.0)
        view.fold([maker.report("gw-odd", maker.at(window, 29), odd)])
        now = maker.at(window + 1, 5)
        false_positives += len(find_regressions(view, expectations, settings, now))
        false_positives += len(find_drifts(view, expectations, settings, now))
        view.evict()

    assert false_positives == 0


def test_drift_is_found_from_aggregates_only(maker) -> None:
    view, settings = FleetView(), DetectionSettings(drift_windows=2)
    expectations = expect(baseline=baseline(maker))
    reports = [r for w in range(3) for r in maker.window(w, gateways=10, shift=2.0)]
    view.fold(reports)

    (finding,) = [f for f in find_drifts(view, expectations, settings, now=maker.at(3, 5))
                  if f.signal == "embedding"]  # fmt: skip
    assert finding.score > settings.embedding_shift_threshold
    assert finding.field_samples == 2 * 10 * 40  # the last two windows' embeddings
    assert finding.baseline_samples == 2000
    assert finding.baseline_report == "sha256:" + "ab" * 32
    assert len(finding.windows) == 2
    for report in reports:  # what left the devices: 16 projected sums, never an embedding
        drift = report.data.health.drift
        assert len(drift.embedding.sums) == 16
        assert drift.embedding.dims == 32
        assert "embeddings" not in report.to_json().decode()


def test_token_logprob_drift_is_its_own_signal(maker) -> None:
    view, settings = FleetView(), DetectionSettings()
    expectations = expect(baseline=baseline(maker))
    view.fold([r for w in range(3) for r in maker.window(w, gateways=10, nll_scale=3.0)])

    signals = {f.signal for f in find_drifts(view, expectations, settings, now=maker.at(3, 5))}
    assert signals == {"logprobs"}


def test_too_few_samples_judge_nothing(maker) -> None:
    view = FleetView()
    settings = DetectionSettings(min_requests_per_window=50, min_drift_embeddings=500,
                                 min_drift_tokens=10_000)  # fmt: skip
    expectations = expect(baseline=baseline(maker))
    for window in range(4):  # slow and shifted, but 2 gateways x 20 requests a window
        view.fold(maker.window(window, gateways=2, requests=20, latency_ms=900.0, shift=2.0,
                               nll_scale=4.0))  # fmt: skip
    now = maker.at(4, 5)

    assert find_regressions(view, expectations, settings, now) == []
    assert find_drifts(view, expectations, settings, now) == []
    assert find_regressions(view, expectations, DetectionSettings(), now) != []  # 40 suffice


def test_an_error_rate_above_the_limit_is_a_regression(maker) -> None:
    view = FleetView()
    for window in range(3):
        view.fold(maker.window(window, errors=8))  # 20 %

    findings = find_regressions(view, expect(), DetectionSettings(), now=maker.at(3, 5))
    assert [(f.metric, f.budget, f.field_value) for f in findings] == [
        ("error_rate", 0.05, pytest.approx(0.2))]  # fmt: skip


def test_field_gates_judge_the_figures_beside_the_host_figure(maker) -> None:
    view = FleetView()
    for window in range(3):
        view.fold(maker.window(window, latency_ms=300.0, ttft_ms=200.0))
    expectations = expect(host={"latency_p95_ms": None, "ttft_p95_ms": 150.0})

    measured = FieldGates().measured(view, expectations, "v-a", "arm64-pi5",
                                     since=maker.at(0, 0), until=maker.at(3, 0))  # fmt: skip
    assert measured is not None
    gates = {g.name: g for g in measured.gates}
    assert gates["field.latency_p95_ms"].passed is False
    assert gates["field.latency_p95_ms"].detail == "host: not measured"
    assert gates["field.ttft_p95_ms"].passed is True
    assert gates["field.ttft_p95_ms"].detail == "host: 150"
    assert gates["field.decode_tokens_per_s"].value == pytest.approx(25.0)
    assert measured.figures.requests == 2 * 20 * 40  # windows 0 and 1: 2 is not complete
    assert np.isclose(measured.since.timestamp(), maker.at(0, 0))
    assert FieldGates().measured(view, None, "v-other", "arm64-pi5", 0.0, 1.0) is None
