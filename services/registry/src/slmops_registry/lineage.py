"""Lineage of one model version, as a pure projection of events (no I/O here).

Every ``apply_*`` is idempotent and keyed by ids, and lists are kept sorted by (event time,
event id), so the projection is the same whether events arrive live - in parallel, possibly
out of order, some twice - or are replayed from the streams in order. That is what makes the
index rebuildable: wipe it, replay, get the same lineage.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from slmops.events import (
    CloudEvent,
    ModelPublished,
    OptimizationCompleted,
    OptimizationFailed,
    ReleaseCreated,
    ReleaseFailed,
    RolloutStarted,
    ValidationFailed,
    ValidationPassed,
)
from slmops.events.payloads import (
    ArtifactRef,
    FieldEvidence,
    GateResult,
    Recipe,
    ReleaseEntry,
    WavePlan,
)
from slmops.events.reports import StampedReport
from slmops_registry.field import (
    FIELD_EVENTS,
    Finding,
    Measured,
    Proposed,
    field_nodes,
    fold_field,
    fold_proposal,
)


class Stamp(BaseModel):
    """Which event said it, and when: the sort key that makes the projection order-free."""

    event_id: str
    time: datetime

    def key(self) -> tuple[datetime, str]:
        return (self.time, self.event_id)


class Published(Stamp):
    manifest_digest: str
    artifact: ArtifactRef
    format: str
    task: str


class Report(Stamp):
    verdict: Literal["passed", "failed"]
    report: ArtifactRef | None = None
    gates: list[GateResult] = Field(default_factory=list)
    reason: str = ""


class Variant(BaseModel):
    variant_id: str
    device_class: str
    recipe: Recipe | None = None
    parent_digest: str | None = None
    artifact: ArtifactRef | None = None
    manifest_digest: str | None = None
    size_bytes: int | None = None
    duration_s: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    reports: list[Report] = Field(default_factory=list)

    @property
    def status(self) -> str:
        if self.reports:
            return "validated" if self.reports[-1].verdict == "passed" else "rejected"
        return "optimized" if self.artifact else "pending"


class OptimizationFailure(Stamp):
    device_class: str | None = None
    recipe_name: str | None = None
    variant_id: str | None = None
    reason: str


class Release(Stamp):
    release_id: str
    entries: list[ReleaseEntry]
    proposal: FieldEvidence | None = Field(
        None, description="Proposed from field evidence (see ``proposals``); null: the version's."
    )


class FailedRelease(Stamp):
    """``release.failed``: every candidate was judged and no class has a variant to ship - not
    a release, so it is kept apart from ``releases`` (nothing may read it as one to roll out)."""

    release_id: str
    entries: list[ReleaseEntry]


class RolloutStep(Stamp):
    type: str
    detail: dict[str, Any] = Field(default_factory=dict)


class Rollout(BaseModel):
    rollout_id: str
    release_id: str | None = None
    waves: list[WavePlan] = Field(default_factory=list)
    history: list[RolloutStep] = Field(default_factory=list)

    @property
    def state(self) -> str:
        if not self.history:
            return ""
        # slmops.rollout.wave.started.v1 -> wave.started
        return self.history[-1].type.removeprefix("slmops.rollout.").rsplit(".v", 1)[0]


class GatewayState(Stamp):
    gateway_id: str
    variant_id: str | None
    rollout_id: str | None = None
    state: Literal["applied", "failed"]
    reason: str = ""


class Lineage(BaseModel):
    model_name: str
    version: str
    published: Published | None = None
    variants: dict[str, Variant] = Field(default_factory=dict)
    optimization_failures: list[OptimizationFailure] = Field(default_factory=list)
    releases: dict[str, Release] = Field(default_factory=dict)
    release_failed: FailedRelease | None = None
    rollouts: dict[str, Rollout] = Field(default_factory=dict)
    field: dict[str, Measured] = Field(
        default_factory=dict, description="Device-measured figures per '<variant>/<class>'."
    )
    findings: dict[str, Finding] = Field(default_factory=dict, description="By detection id.")
    proposals: dict[str, Proposed] = Field(default_factory=dict, description="By release id.")

    def to_api(self, gateways: list[GatewayState]) -> dict[str, Any]:
        """The JSON of ``GET .../lineage``: lists sorted by id, statuses derived."""
        return {
            "model_name": self.model_name,
            "version": self.version,
            "published": self.published.model_dump(mode="json") if self.published else None,
            "variants": [
                {**v.model_dump(mode="json"), "status": v.status}
                for _, v in sorted(self.variants.items())
            ],
            "optimization_failures": [
                f.model_dump(mode="json") for f in self.optimization_failures
            ],
            "releases": [r.model_dump(mode="json") for _, r in sorted(self.releases.items())],
            "release_failed": (
                self.release_failed.model_dump(mode="json") if self.release_failed else None
            ),
            "rollouts": [
                {**r.model_dump(mode="json"), "state": r.state}
                for _, r in sorted(self.rollouts.items())
            ],
            "gateways": {
                g.gateway_id: g.model_dump(mode="json", exclude={"gateway_id"})
                for g in sorted(gateways, key=lambda g: g.gateway_id)
            },
            **field_nodes(self.field, self.findings, self.proposals),
        }


def _stamp(event: CloudEvent[Any]) -> dict[str, Any]:
    return {"event_id": event.id, "time": event.time}


def _insert_sorted(items: list[Any], item: Stamp) -> bool:
    if any(existing.event_id == item.event_id for existing in items):
        return False
    items.append(item)
    items.sort(key=lambda s: s.key())
    return True


def _variant(lineage: Lineage, variant_id: str, device_class: str) -> Variant:
    return lineage.variants.setdefault(
        variant_id, Variant(variant_id=variant_id, device_class=device_class)
    )


def apply_event(lineage: Lineage, event: CloudEvent[Any]) -> bool:
    """Fold one event into ``lineage``; returns whether anything changed."""
    data = event.data
    before = lineage.model_dump_json()
    if isinstance(data, ModelPublished) and data.manifest_digest is not None:
        candidate = Published(
            **_stamp(event),
            manifest_digest=data.manifest_digest,
            artifact=data.artifact,
            format=data.format,
            task=data.task,
        )
        if lineage.published is None or candidate.key() < lineage.published.key():
            lineage.published = candidate
    elif isinstance(data, OptimizationCompleted):
        variant = _variant(lineage, data.variant_id, data.device_class)
        variant.recipe, variant.parent_digest = data.recipe, data.parent_digest
        variant.artifact, variant.manifest_digest = data.artifact, data.manifest_digest
        variant.size_bytes, variant.duration_s = data.artifact.size_bytes, data.duration_s
        variant.metrics = dict(data.metrics)
    elif isinstance(data, OptimizationFailed):
        _insert_sorted(
            lineage.optimization_failures,
            OptimizationFailure(
                **_stamp(event),
                device_class=data.device_class,
                recipe_name=data.recipe_name,
                variant_id=data.variant_id,
                reason=data.reason,
            ),
        )
    elif isinstance(data, ValidationPassed | ValidationFailed):
        passed = isinstance(data, ValidationPassed)
        report = Report(
            **_stamp(event),
            verdict="passed" if passed else "failed",
            report=data.report,
            gates=data.gates,
            reason="" if passed else data.reason,  # type: ignore[union-attr]
        )
        _insert_sorted(_variant(lineage, data.variant_id, data.device_class).reports, report)
    elif isinstance(data, ReleaseCreated):
        lineage.releases[data.release_id] = Release(
            **_stamp(event), release_id=data.release_id, entries=data.entries,
            proposal=data.proposal,
        )  # fmt: skip
        fold_proposal(lineage.proposals, event)
    elif isinstance(data, ReleaseFailed) and data.proposal is not None:
        fold_proposal(lineage.proposals, event)  # not the version's release failing
    elif isinstance(data, FIELD_EVENTS):
        fold_field(lineage.field, lineage.findings, event)
    elif isinstance(data, ReleaseFailed):
        failed = FailedRelease(**_stamp(event), release_id=data.release_id, entries=data.entries)
        if lineage.release_failed is None or failed.key() > lineage.release_failed.key():
            lineage.release_failed = failed
    elif event.type.startswith("slmops.rollout."):
        rollout = lineage.rollouts.setdefault(data.rollout_id, Rollout(rollout_id=data.rollout_id))
        if isinstance(data, RolloutStarted):
            rollout.release_id, rollout.waves = data.release_id, data.waves
        detail = data.model_dump(mode="json", exclude={"rollout_id", "waves", "model_name"})
        _insert_sorted(
            rollout.history, RolloutStep(**_stamp(event), type=event.type, detail=detail)
        )
    return lineage.model_dump_json() != before


def gateway_state(seen: StampedReport) -> GatewayState | None:
    """What a gateway report says about which variant a gateway runs (None: not lineage)."""
    data = seen.report
    if data.kind not in ("applied", "failed"):
        return None  # registrations and health aggregates are not lineage
    return GatewayState(
        event_id=seen.event_id,
        time=seen.time,
        gateway_id=data.gateway_id,
        variant_id=data.variant_id,
        rollout_id=data.rollout_id,
        state=data.kind,
        reason=data.reason,
    )
