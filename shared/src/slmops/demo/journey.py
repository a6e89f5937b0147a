"""One model version's journey, folded from the platform's own events as they pass on NATS.

The demo shows progress from what the services announce, not from private hooks: a job is
optimized when ``optimization.completed`` (or ``failed``) says so, a wave is sent when the
rollout service starts it, a gateway has its assignment when its ``acknowledged`` report
arrives. The same events any other consumer of the platform would see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slmops.events import (
    CloudEvent,
    GatewayReport,
    OptimizationCompleted,
    OptimizationFailed,
    OptimizationPlanned,
    ReleaseCreated,
    ReleaseFailed,
    RolloutCompleted,
    RolloutPaused,
    RolloutRolledBack,
    RolloutStarted,
    RolloutWaveStarted,
    ValidationFailed,
    ValidationPassed,
)

_PIPELINE = (
    OptimizationPlanned,
    OptimizationCompleted,
    OptimizationFailed,
    ValidationPassed,
    ValidationFailed,
    ReleaseCreated,
    ReleaseFailed,
)


@dataclass
class Journey:
    """What happened so far to ``model_name`` ``version``, from publish to the fleet."""

    model_name: str
    version: str
    trace_id: str | None = None
    published: bool = False
    jobs: dict[str, tuple[str, str]] = field(default_factory=dict)  # variant -> class, recipe
    planned: bool = False
    skipped: dict[str, str] = field(default_factory=dict)
    optimized: dict[str, str] = field(default_factory=dict)  # variant -> "completed"/"failed"
    failures: list[str] = field(default_factory=list)
    judged: dict[str, str] = field(default_factory=dict)  # variant -> "passed"/"failed"
    release: ReleaseCreated | None = None
    rollout_id: str | None = None
    waves: list[int] = field(default_factory=list)  # target count per wave
    wave_index: int = -1
    acknowledged: set[str] = field(default_factory=set)
    applied: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    last_ack_at: str | None = None
    outcome: str | None = None  # completed / paused / rolled_back, with its reason
    outcome_reason: str = ""
    news: list[str] = field(default_factory=list)  # milestones not yet shown

    def _tell(self, what: str) -> None:
        self.news.append(f"{self.model_name} {self.version}: {what}")

    def fold(self, event: CloudEvent[Any]) -> bool:
        """Take in one event; True if it was about this journey."""
        data = event.data
        if isinstance(data, _PIPELINE):
            if (data.model_name, data.version) != (self.model_name, self.version):
                return False
            self._pipeline(data)
            return True
        if isinstance(data, RolloutStarted):
            if self.release is None or data.release_id != self.release.release_id:
                return False
            self.rollout_id = data.rollout_id
            self.waves = [w.target_count for w in data.waves]
            self._tell(f"rollout {data.rollout_id} started, waves of {self.waves} gateways")
            return True
        if self.rollout_id is None or getattr(data, "rollout_id", None) != self.rollout_id:
            return False
        self._rollout(event, data)
        return True

    def _pipeline(self, data: Any) -> None:
        if isinstance(data, OptimizationPlanned):
            self.planned = True
            self.jobs.update({j.variant_id: (j.device_class, j.recipe_name) for j in data.jobs})
            self.skipped.update(data.skipped)
            self._tell(f"{len(data.jobs)} optimization jobs planned")
        elif isinstance(data, OptimizationCompleted):
            self.optimized[data.variant_id] = "completed"
            size_mb = data.artifact.size_bytes / 1e6
            self._tell(f"{data.device_class}: {data.recipe.name} optimized in "
                       f"{data.duration_s:.1f} s ({size_mb:.1f} MB)")  # fmt: skip
        elif isinstance(data, OptimizationFailed):
            self.optimized[data.variant_id or f"failed-{len(self.failures)}"] = "failed"
            self.failures.append(f"{data.device_class}/{data.recipe_name}: {data.reason}")
            self._tell(f"{data.device_class}: {data.recipe_name} failed: {data.reason[:80]}")
        elif isinstance(data, ValidationPassed | ValidationFailed):
            verdict = "passed" if isinstance(data, ValidationPassed) else "failed"
            self.judged[data.variant_id] = verdict
            why = f": {data.reason[:80]}" if isinstance(data, ValidationFailed) else ""
            recipe = self._recipe(data.variant_id)
            self._tell(f"{data.device_class}: {recipe} {verdict} validation{why}")
        elif isinstance(data, ReleaseCreated):
            self.release = data
            chosen = ", ".join(f"{e.device_class} -> {self._recipe(e.variant_id)}"
                               for e in data.entries)  # fmt: skip
            self._tell(f"release {data.release_id}: {chosen}")
        elif isinstance(data, ReleaseFailed):  # nothing to ship: the journey ends here
            why = "; ".join(f"{e.device_class}: {e.reason}" for e in data.entries)
            self.outcome, self.outcome_reason = "no release", why
            self._tell(f"no release: no device class has a variant ({why[:160]})")

    def _recipe(self, variant_id: str | None) -> str:
        return self.jobs.get(variant_id, ("", "?"))[1] if variant_id else "none"

    def _rollout(self, event: CloudEvent[Any], data: Any) -> None:
        if isinstance(data, RolloutWaveStarted):
            self.wave_index = max(self.wave_index, data.wave_index)
            self._tell(f"wave {data.wave_index + 1} started: {data.target_count} gateways")
        elif isinstance(data, GatewayReport):
            if data.kind == "acknowledged":
                self.acknowledged.add(data.gateway_id)
                self.last_ack_at = event.time.isoformat()
            elif data.kind == "applied":
                self.applied.add(data.gateway_id)
            elif data.kind == "failed":
                self.failed.add(data.gateway_id)
        elif isinstance(data, RolloutCompleted):
            self.outcome = "completed"
            self._tell(
                f"rollout completed: {data.gateways_updated} updated, "
                f"{data.gateways_failed} failed, {data.gateways_silent} silent"
            )
        elif isinstance(data, RolloutPaused):
            self.outcome, self.outcome_reason = "paused", data.reason
            self._tell(f"rollout paused: {data.reason}")
        elif isinstance(data, RolloutRolledBack):
            self.outcome, self.outcome_reason = "rolled_back", data.reason
            self._tell(f"rollout rolled back: {data.reason}")

    # --- what the progress bars show --------------------------------------------------------

    @property
    def to_judge(self) -> int:
        """Variants the validator will judge: every optimized one."""
        return sum(1 for v in self.optimized.values() if v == "completed")

    @property
    def pipeline_done(self) -> bool:
        return self.release is not None or self.outcome == "no release"

    @property
    def targets(self) -> int:
        return sum(self.waves)

    @property
    def finished(self) -> bool:
        return self.outcome is not None
