"""Releases: once every candidate of a model version is judged, the best per device class.

The tally of a version lives in JetStream KV (``slmops-jobs``, key ``validator.release.<id>``):
the jobs the optimizer planned, and each job's end (validation passed or failed, or the
optimization failed). Updates are compare-and-set, so handlers running at once never lose one.
When the last planned job lands, ``release.created`` names per class the best passing variant by
the class's objective - smallest, or fastest by host latency - or says why there is none. A
version with nothing to ship in any class is not a release: ``release.failed`` says per class
why, so nothing downstream (a rollout, a channel) mistakes it for something to roll out.

A re-optimization on field evidence has a tally of its own, keyed by its ``release_id``
(``slmops.events.field_release_id``), beside the version's: it decides one device class only,
by the candidates' predicted field figure (the field's value x the host ratio against the
regressed variant), and its decision carries the evidence as ``proposal``.
"""

from __future__ import annotations

from typing import Any, Literal

from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from slmops.bus.kvstate import update_model
from slmops.events import release_id_for
from slmops.events.payloads import (
    ArtifactRef,
    FieldEvidence,
    ReleaseCreated,
    ReleaseEntry,
    ReleaseFailed,
)
from slmops.profiles import DeviceProfile


class Candidate(BaseModel):
    variant_id: str
    device_class: str
    recipe_name: str = ""
    verdict: Literal["passed", "failed", "optimization_failed"]
    reason: str = ""
    artifact: ArtifactRef | None = None
    manifest_digest: str | None = None
    latency_p50_ms: float | None = None
    field_metric: str | None = Field(
        None, description="Judged against the field: the finding's metric (latency_p95_ms...)."
    )
    field_value: float | None = Field(
        None, description="The predicted field figure: the field's value x the host ratio."
    )
    field_bound: Literal["max", "min"] | None = None

    def field_rank(self) -> float | None:
        """The predicted field figure, lower is better (a "min" figure, tokens/s, negated)."""
        if self.field_value is None:
            return None
        return -self.field_value if self.field_bound == "min" else self.field_value


class Tally(BaseModel):
    model_name: str
    version: str
    release_id: str | None = Field(
        None, description="A re-optimization's own release; null = the version's release."
    )
    proposal: FieldEvidence | None = Field(
        None, description="The field evidence a re-optimization's candidates must beat."
    )
    planned: dict[str, str] | None = Field(None, description="variant id -> device class")
    skipped: dict[str, str] = Field(default_factory=dict)
    judged: dict[str, Candidate] = Field(default_factory=dict)
    released: bool = Field(False, description="The decision was announced (created or failed).")
    outcome: Literal["created", "failed"] | None = Field(
        None, description="release.created, or release.failed: no class had a variant to ship."
    )

    @property
    def complete(self) -> bool:
        return self.planned is not None and all(v in self.judged for v in self.planned)

    @property
    def decided_id(self) -> str:
        """The id of the release this tally decides."""
        return self.release_id or release_id_for(self.model_name, self.version)


def tally_key(model_name: str, version: str, release_id: str | None = None) -> str:
    """The version's tally, or with ``release_id`` a re-optimization's own."""
    return release_key(release_id or release_id_for(model_name, version))


def release_key(release_id: str) -> str:
    """The tally deciding the release ``release_id``."""
    return "validator.release." + release_id


async def update_tally(
    kv: KeyValue, model_name: str, version: str, change: Any, release_id: str | None = None
) -> Tally:
    """Apply ``change(tally)`` with compare-and-set, retrying when another update won."""
    return await update_model(
        kv, tally_key(model_name, version, release_id), Tally, change,
        lambda: Tally(model_name=model_name, version=version, release_id=release_id),
    )  # fmt: skip


def choose(tally: Tally, profiles: dict[str, DeviceProfile]) -> ReleaseCreated | ReleaseFailed:
    """The release of a complete tally: per class, the best passing variant or why none; a
    ``ReleaseFailed`` with the same entries when no class has one. A re-optimization's tally
    decides its finding's class only."""
    classes = sorted(set((tally.planned or {}).values()) | set(tally.skipped))
    if tally.proposal is not None:
        classes = [tally.proposal.device_class]
    entries = []
    for device_class in classes:
        if device_class in tally.skipped and device_class not in (tally.planned or {}).values():
            entries.append(
                ReleaseEntry(
                    device_class=device_class,
                    reason=f"no candidates: {tally.skipped[device_class]}",
                )
            )
            continue
        mine = [c for c in tally.judged.values() if c.device_class == device_class]
        passing = [c for c in mine if c.verdict == "passed" and c.artifact is not None]
        if not mine:
            entries.append(
                ReleaseEntry(device_class=device_class, reason="no candidates were planned")
            )
            continue
        if not passing:
            why = "; ".join(f"{c.recipe_name or c.variant_id}: {c.reason}" for c in mine)
            entries.append(
                ReleaseEntry(
                    device_class=device_class, reason=f"no variant passed validation ({why})"
                )
            )
            continue
        best, why = _best(passing, profiles.get(device_class), tally.proposal is not None)
        entries.append(
            ReleaseEntry(
                device_class=device_class,
                variant_id=best.variant_id,
                artifact=best.artifact,
                manifest_digest=best.manifest_digest,
                reason=why,
            )
        )
    kind = ReleaseCreated if any(e.variant_id for e in entries) else ReleaseFailed
    return kind(
        release_id=tally.decided_id,
        model_name=tally.model_name,
        version=tally.version,
        entries=entries,
        proposal=tally.proposal,
    )


def _best(
    passing: list[Candidate], profile: DeviceProfile | None, proposal: bool = False
) -> tuple[Candidate, str]:
    """``proposal``: a re-optimization, decided by the predicted field figure whatever the
    class's objective (its point is the figure the field broke)."""

    def size(c: Candidate) -> int:
        return c.artifact.size_bytes if c.artifact else 0

    others = f"{len(passing)} passed"
    fastest = profile is not None and profile.objective == "fastest"
    predicted = {c.field_metric for c in passing if c.field_rank() is not None}
    on_field = len(predicted) == 1 and all(c.field_rank() is not None for c in passing)
    if on_field and (proposal or fastest):
        # judged against the field, all on the same figure: the field's numbers decide, not
        # the host's. Mixed (some with a prediction, some without) cannot be ranked on it.
        best = min(passing, key=lambda c: (c.field_rank() or 0.0, size(c), c.variant_id))
        return best, (
            f"best predicted field {best.field_metric} of {others}: {best.recipe_name}, "
            f"{best.field_value:.4g}, {size(best) / 1e6:.1f} MB"
        )
    timed = [c for c in passing if c.latency_p50_ms is not None]
    if profile is not None and profile.objective == "fastest" and len(timed) == len(passing):
        best = min(passing, key=lambda c: (c.latency_p50_ms or 0.0, size(c)))
        return best, (
            f"fastest of {others}: {best.recipe_name}, p50 "
            f"{best.latency_p50_ms:.2f} ms, {size(best) / 1e6:.1f} MB"
        )
    best = min(passing, key=lambda c: (size(c), c.variant_id))
    note = (
        " (objective 'fastest', but latency is not measurable on this host: smallest chosen)"
        if profile is not None and profile.objective == "fastest"
        else ""
    )
    return best, f"smallest of {others}: {best.recipe_name}, {size(best) / 1e6:.1f} MB{note}"
