"""Regressions and drift found in the fleet view, and the field gates of a variant.

Judged on complete windows only, a window with too few requests counting neither way:

* A regression: a class's field figure (FIELD_METRICS, and the error rate) breaks its budget in
  each of the last ``windows_required`` windows. One window over budget is not enough - a
  burst of slow requests on a few devices is not a regression of the class.
* Drift: the drift signature merged over the last ``drift_windows`` windows against the
  validation report's baseline, once enough embeddings or tokens are behind it.

Findings carry deterministic ids (:func:`slmops.events.derive_event_id`): the same ongoing
regression is the same finding at every tick, so it is published once.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slmops.events.envelope import derive_event_id
from slmops.events.payloads import (
    FieldFigures,
    FieldWindow,
    FleetDriftDetected,
    FleetMeasured,
    FleetRegressionDetected,
    GateResult,
)
from slmops.telemetry.budgets import FIELD_METRICS
from slmops.telemetry.drift import DriftSignature, embedding_shift, logprob_shift
from slmops_telemetry.expectations import Expectations
from slmops_telemetry.view import FleetView, span_figures
from slmops_telemetry.windows import Window

ExpectationsMap = Mapping[tuple[str, str], Expectations]
ERROR_RATE = "error_rate"


class DetectionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    windows_required: int = Field(2, ge=1, description="Consecutive windows over budget.")
    min_requests_per_window: int = Field(20, ge=1, description="Fewer: the window is not judged.")
    max_error_rate: float = Field(0.05, ge=0, le=1, description="Error rate a class may have.")
    embedding_shift_threshold: float = Field(
        0.5, gt=0, description="Standardized mean shift of served embeddings that is drift."
    )
    logprob_psi_threshold: float = Field(
        0.25, gt=0, description="Population stability index of token log-probs that is drift."
    )
    min_drift_embeddings: int = Field(200, ge=2, description="Fewer: embedding drift not judged.")
    min_drift_tokens: int = Field(2000, ge=1, description="Fewer: log-prob drift not judged.")
    drift_windows: int = Field(2, ge=1, description="Windows merged into the judged signature.")
    label_sets: bool = Field(
        False, description="Also judge each label set of a class on its own (more findings, "
        "and more chances of a false one)."
    )  # fmt: skip


def find_regressions(
    view: FleetView, expectations: ExpectationsMap, settings: DetectionSettings,
    now: float | None = None,
) -> list[FleetRegressionDetected]:  # fmt: skip
    findings = []
    for (variant_id, device_class), expected in sorted(expectations.items()):
        identity = view.identity(variant_id)
        if identity is None:
            continue
        for labels in _scopes(view, variant_id, device_class, settings):
            windows = [w for w in view.windows(variant_id, device_class, labels, now=now)
                       if w.requests >= settings.min_requests_per_window]  # fmt: skip
            if len(windows) < settings.windows_required:
                continue
            figures = [w.figures() for w in windows]
            for metric, bound, budget in _budgets(expected, settings):
                values = [_value(f, metric) for f in figures]
                if not all(_breaks(v, bound, budget) for v in values[-settings.windows_required :]):
                    continue
                first = len(values) - settings.windows_required
                while first > 0 and _breaks(values[first - 1], bound, budget):
                    first -= 1  # the regression began earlier: its id is its first window's
                evidence = windows[-settings.windows_required :]
                field_value = _value(span_figures(evidence), metric)
                assert field_value is not None  # every evidence window has the figure
                detection_id = derive_event_id(
                    "fleet.regression", variant_id, device_class, _canonical(labels), metric,
                    _iso(windows[first].start),
                )  # fmt: skip
                findings.append(FleetRegressionDetected(
                    detection_id=detection_id, model_name=identity[0], version=identity[1],
                    variant_id=variant_id, device_class=device_class, labels=labels or {},
                    windows=_evidence(evidence, values[-settings.windows_required :]),
                    metric=metric, bound=bound, budget=budget, field_value=field_value,
                    host_value=expected.host_value(metric),
                ))  # fmt: skip
    return findings


def find_drifts(
    view: FleetView, expectations: ExpectationsMap, settings: DetectionSettings,
    now: float | None = None,
) -> list[FleetDriftDetected]:  # fmt: skip
    findings = []
    for (variant_id, device_class), expected in sorted(expectations.items()):
        baseline, identity = expected.drift_baseline, view.identity(variant_id)
        if baseline is None or identity is None:
            continue
        for labels in _scopes(view, variant_id, device_class, settings):
            windows = view.windows(variant_id, device_class, labels, now=now)
            span = windows[-settings.drift_windows :]
            merged = Window(span[0].start, span[0].window_s) if span else None
            for window in span:
                assert merged is not None
                merged.merge(window)
            current = merged.drift.signature() if merged is not None else None
            if current is None:
                continue
            for signal, score, threshold, samples, base_samples in _drift_scores(
                baseline, current, settings
            ):
                if score <= threshold:
                    continue
                findings.append(FleetDriftDetected(
                    detection_id=derive_event_id(
                        "fleet.drift", variant_id, device_class, _canonical(labels), signal,
                        expected.report_digest or "-"),
                    model_name=identity[0], version=identity[1], variant_id=variant_id,
                    device_class=device_class, labels=labels or {},
                    windows=_evidence(span, [_window_score(baseline, w, signal) for w in span]),
                    signal=signal, score=score, threshold=threshold, field_samples=samples,
                    baseline_samples=base_samples, baseline_report=expected.report_digest,
                ))  # fmt: skip
    return findings


class FieldGates:
    """The device-measured figures of a variant on a class, judged against its budgets: what
    the registry records against the variant (``fleet.measured``)."""

    def __init__(self, settings: DetectionSettings | None = None) -> None:
        self.settings = settings or DetectionSettings()

    def measured(
        self, view: FleetView, expectations: Expectations | ExpectationsMap | None,
        variant_id: str, device_class: str, since: float, until: float,
    ) -> FleetMeasured | None:  # fmt: skip
        """None when nothing was measured over ``[since, until)`` (epoch seconds)."""
        if isinstance(expectations, Mapping):
            expectations = expectations.get((variant_id, device_class))
        identity = view.identity(variant_id)
        figures = view.figures(variant_id, device_class, since=since, until=until)
        if identity is None or figures.requests == 0:
            return None
        gates = [self._gate(metric, bound, budget, figures, expectations)
                 for metric, bound, budget in _budgets(expectations, self.settings)]  # fmt: skip
        return FleetMeasured(model_name=identity[0], version=identity[1], variant_id=variant_id,
                             device_class=device_class, since=_time(since), until=_time(until),
                             figures=figures, gates=gates)  # fmt: skip

    @staticmethod
    def _gate(
        metric: str, bound: Literal["max", "min"], budget: float, figures: FieldFigures,
        expectations: Expectations | None,
    ) -> GateResult:  # fmt: skip
        value = _value(figures, metric)
        host = expectations.host_value(metric) if expectations is not None else None
        return GateResult(
            name=f"field.{metric}", value=value, budget=budget,
            unit=next((m.unit for m in FIELD_METRICS if m.name == metric), ""), bound=bound,
            passed=None if value is None else not _breaks(value, bound, budget),
            detail="host: not measured" if host is None else f"host: {host:.4g}",
        )  # fmt: skip


def _budgets(
    expected: Expectations | None, settings: DetectionSettings
) -> list[tuple[str, Literal["max", "min"], float]]:
    budgets: list[tuple[str, Literal["max", "min"], float]] = []
    if expected is not None:
        for metric in FIELD_METRICS:
            budget = metric.budget_of(expected.budgets)
            if budget is not None:
                budgets.append((metric.name, metric.bound, budget))
    budgets.append((ERROR_RATE, "max", settings.max_error_rate))
    return budgets


def _drift_scores(
    baseline: DriftSignature, current: DriftSignature, settings: DetectionSettings
) -> list[tuple[Literal["embedding", "logprobs"], float, float, int, int]]:
    scores: list[tuple[Literal["embedding", "logprobs"], float, float, int, int]] = []
    base, cur = baseline.embedding, current.embedding
    if base is not None and cur is not None and cur.count >= settings.min_drift_embeddings:
        with contextlib.suppress(ValueError):  # another width, or a baseline of one
            scores.append(("embedding", embedding_shift(base, cur),
                           settings.embedding_shift_threshold, cur.count, base.count))  # fmt: skip
    lp_base, lp_cur = baseline.logprobs, current.logprobs
    if lp_base is not None and lp_cur is not None and lp_cur.count >= settings.min_drift_tokens:
        scores.append(("logprobs", logprob_shift(lp_base, lp_cur),
                       settings.logprob_psi_threshold, lp_cur.count, lp_base.count))  # fmt: skip
    return scores


def _window_score(baseline: DriftSignature, window: Window, signal: str) -> float | None:
    current = window.drift.signature()
    try:
        if signal == "embedding" and baseline.embedding and current and current.embedding:
            return embedding_shift(baseline.embedding, current.embedding)
        if signal == "logprobs" and baseline.logprobs and current and current.logprobs:
            return logprob_shift(baseline.logprobs, current.logprobs)
    except ValueError:
        return None
    return None


def _scopes(
    view: FleetView, variant_id: str, device_class: str, settings: DetectionSettings
) -> list[dict[str, str] | None]:
    """The whole class (None: merged over label sets), then each label set if asked."""
    scopes: list[dict[str, str] | None] = [None]
    if settings.label_sets:
        scopes += [dict(labels) for labels in view.label_sets(variant_id, device_class) if labels]
    return scopes


def _value(figures: FieldFigures, metric: str) -> float | None:
    value = getattr(figures, metric)
    return None if value is None else float(value)


def _breaks(value: float | None, bound: str, budget: float) -> bool:
    if value is None:
        return False
    return value > budget if bound == "max" else value < budget


def _evidence(windows: Sequence[Window], values: Sequence[float | None]) -> list[FieldWindow]:
    return [FieldWindow(start=w.start_time, window_s=w.window_s, gateways=w.gateways,
                        requests=w.requests, value=v)
            for w, v in zip(windows, values, strict=True)]  # fmt: skip


def _canonical(labels: dict[str, str] | None) -> str:
    return json.dumps(sorted((labels or {}).items()), separators=(",", ":"))


def _iso(epoch_s: float) -> str:
    return _time(epoch_s).isoformat()


def _time(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)
