"""The field's part of a model version's lineage: what devices measured, what was found, and
what was proposed for it (pure: no I/O, like ``lineage.py``).

Three kinds of node, each keyed so that folding is idempotent and order-free:

- ``Measured`` per (variant, class): the latest ``fleet.measured`` (figures merged across the
  class's gateways over a span, and the gates they make against the class's budgets). The
  registry signs these on request (``field_nodes.py``).
- ``Finding`` per detection id: a ``fleet.regression.detected`` or ``fleet.drift.detected``,
  first seen and last seen (a finding is re-announced while it holds; its evidence is the
  latest).
- ``Proposed`` per release id: a release proposed from a finding (``release.created`` with a
  ``proposal``: finding -> new variant) or a re-optimization that found no candidate meeting
  the field budget (``release.failed`` with one).

So a version's lineage reads: published -> variant -> report -> release -> rollout ->
gateways -> field figures -> finding -> proposed release -> new variant -> its rollout.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from slmops.events import (
    CloudEvent,
    FleetDriftDetected,
    FleetMeasured,
    FleetRegressionDetected,
    ReleaseCreated,
    ReleaseFailed,
)
from slmops.events.payloads import FieldEvidence, FieldFigures, FieldWindow, GateResult

FIELD_EVENTS = (FleetMeasured, FleetRegressionDetected, FleetDriftDetected)


class _Stamped(BaseModel):
    event_id: str
    time: datetime

    def key(self) -> tuple[datetime, str]:
        return (self.time, self.event_id)


class Measured(_Stamped):
    """A variant's device-measured figures in one class (the latest ``fleet.measured``)."""

    variant_id: str
    device_class: str
    since: datetime
    until: datetime
    figures: FieldFigures
    gates: list[GateResult] = Field(default_factory=list)
    measured_by: str = Field(description="The event's source: the service that folded them.")


class Finding(_Stamped):
    """A regression or drift found in the field against a variant; ``event_id``/``time`` are
    the first announcement, ``last_*`` the latest (whose evidence it holds)."""

    detection_id: str
    kind: Literal["regression", "drift"]
    variant_id: str
    device_class: str
    labels: dict[str, str] = Field(default_factory=dict)
    windows: list[FieldWindow] = Field(default_factory=list)
    # regression
    metric: str | None = None
    bound: Literal["max", "min"] | None = None
    budget: float | None = None
    field_value: float | None = None
    host_value: float | None = None
    # drift
    signal: Literal["embedding", "logprobs"] | None = None
    score: float | None = None
    threshold: float | None = None
    baseline_report: str | None = None
    last_event_id: str
    last_time: datetime

    def last_key(self) -> tuple[datetime, str]:
        return (self.last_time, self.last_event_id)


class Proposed(_Stamped):
    """A release proposed from a finding: the variant it replaces in a class, and the new one
    (None: no candidate met the field budget - ``outcome`` failed, ``reason`` says why)."""

    release_id: str
    detection_id: str
    device_class: str
    replaces: str = Field(description="The variant the field measured.")
    variant_id: str | None = Field(None, description="The proposed new variant.")
    outcome: Literal["proposed", "failed"]
    reason: str = ""
    evidence: FieldEvidence


def measured_key(variant_id: str, device_class: str) -> str:
    return f"{variant_id}/{device_class}"


def fold_field(
    field: dict[str, Measured], findings: dict[str, Finding], event: CloudEvent[Any]
) -> None:
    """Fold a ``fleet.*`` event into a lineage's field figures or findings."""
    data, stamp = event.data, {"event_id": event.id, "time": event.time}
    if isinstance(data, FleetMeasured):
        key = measured_key(data.variant_id, data.device_class)
        candidate = Measured(
            **stamp, variant_id=data.variant_id, device_class=data.device_class,
            since=data.since, until=data.until, figures=data.figures, gates=data.gates,
            measured_by=event.source,
        )  # fmt: skip
        if key not in field or candidate.key() > field[key].key():
            field[key] = candidate
        return
    if not isinstance(data, FleetRegressionDetected | FleetDriftDetected):
        return
    latest = _finding(data, event)
    current = findings.get(data.detection_id)
    if current is None:
        findings[data.detection_id] = latest
        return
    first = min(current, latest, key=lambda f: f.key())
    last = max(current, latest, key=lambda f: f.last_key())
    findings[data.detection_id] = last.model_copy(
        update={"event_id": first.event_id, "time": first.time}
    )


def _finding(data: FleetRegressionDetected | FleetDriftDetected, event: Any) -> Finding:
    common = {
        "event_id": event.id, "time": event.time, "last_event_id": event.id,
        "last_time": event.time, "detection_id": data.detection_id,
        "variant_id": data.variant_id, "device_class": data.device_class,
        "labels": dict(data.labels), "windows": data.windows,
    }  # fmt: skip
    if isinstance(data, FleetRegressionDetected):
        return Finding(**common, kind="regression", metric=data.metric, bound=data.bound,
                       budget=data.budget, field_value=data.field_value,
                       host_value=data.host_value)  # fmt: skip
    return Finding(**common, kind="drift", signal=data.signal, score=data.score,
                   threshold=data.threshold, baseline_report=data.baseline_report)  # fmt: skip


def fold_proposal(
    proposals: dict[str, Proposed], event: CloudEvent[ReleaseCreated] | CloudEvent[ReleaseFailed]
) -> None:
    """Record the proposal a release carries (a version's own release carries none)."""
    data = event.data
    evidence = data.proposal
    if evidence is None:
        return
    entry = next((e for e in data.entries if e.device_class == evidence.device_class), None)
    failed = isinstance(data, ReleaseFailed)
    candidate = Proposed(
        event_id=event.id, time=event.time, release_id=data.release_id,
        detection_id=evidence.detection_id, device_class=evidence.device_class,
        replaces=evidence.variant_id,
        variant_id=None if failed or entry is None else entry.variant_id,
        outcome="failed" if failed else "proposed", reason=entry.reason if entry else "",
        evidence=evidence,
    )  # fmt: skip
    current = proposals.get(data.release_id)
    if current is None or candidate.key() < current.key():  # the first word on it stays
        proposals[data.release_id] = candidate


def field_nodes(
    field: dict[str, Measured], findings: dict[str, Finding], proposals: dict[str, Proposed]
) -> dict[str, Any]:
    """The field nodes of ``GET .../lineage``: lists in a stable order."""
    return {
        "field": [m.model_dump(mode="json") for _, m in sorted(field.items())],
        "findings": [f.model_dump(mode="json")
                     for f in sorted(findings.values(), key=lambda f: f.key())],
        "proposals": [p.model_dump(mode="json")
                      for p in sorted(proposals.values(), key=lambda p: p.key())],
    }  # fmt: skip


#: What a signed statement of device-measured figures says it is.
STATEMENT_KIND = "slmops.field-figures.v1"


def field_statement(model_name: str, version: str, measured: Measured) -> bytes:
    """The bytes the registry signs for a variant's figures in one class: canonical JSON
    (sorted keys, no spaces) of ``kind``, ``model_name``, ``version``, ``variant_id``,
    ``device_class``, the span ``since``/``until`` (ISO 8601), ``figures`` (gateways, requests,
    error rate, latency/TTFT p50/p95 in ms, decode tokens/s, peak memory in MB), ``gates``
    (each figure against the class's budget), and which ``fleet.measured`` event said it
    (``measured_event_id``, ``measured_at``, ``measured_by``). Made from what the lineage
    recorded only, so the same record always gives the same bytes (and, Ed25519 being
    deterministic, the same signature)."""
    body = {
        "kind": STATEMENT_KIND, "model_name": model_name, "version": version,
        **measured.model_dump(mode="json", include={"variant_id", "device_class", "since",
                                                    "until", "figures", "gates", "measured_by"}),
        "measured_event_id": measured.event_id,
        "measured_at": measured.model_dump(mode="json")["time"],
    }  # fmt: skip
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
