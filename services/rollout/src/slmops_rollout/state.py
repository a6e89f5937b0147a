"""A rollout's state and the rule that moves it: pure data and pure decisions (no I/O).

The state lives in JetStream KV (``slmops-rollouts``), so a restarted service resumes where it
was. ``record`` folds a gateway's report in; ``decide`` looks at the current wave and says
what to do now - wait, advance, complete or pause - with the figures behind it. A gateway that
has been silent past the policy's timeout stops counting: it never blocks its wave. A
``waiting`` rollout (an automatic one whose release came before any gateway it targets) has no
waves yet: the ticker plans it once such gateways register.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field

from slmops.events.payloads import DesiredModel, GatewayReport, HealthAggregate
from slmops_rollout.plans import Overlay, WavePolicy

GatewayStatus = Literal["pending", "assigned", "acknowledged", "applied", "failed", "rolled_back"]
WAITING = ("assigned", "acknowledged")  # sent, its outcome not known yet


class GatewayProgress(BaseModel):
    status: GatewayStatus = "pending"
    wave: int = Field(ge=0)
    device_class: str = ""
    overlay: dict[str, int] = Field(default_factory=dict, description="Its local settings.")
    generation: int | None = None
    assigned_at: datetime | None = None
    reason: str = ""
    previous_variant_id: str | None = Field(
        None, description="What it ran when the rollout was planned: the rollback target."
    )
    baseline_p95_ms: float | None = Field(None, description="Its p95 before the rollout.")


class RolloutState(BaseModel):
    rollout_id: str
    release_id: str
    model_name: str
    version: str
    desired: dict[str, DesiredModel] = Field(description="Per device class: what to install.")
    selector: dict[str, str] = Field(default_factory=dict)
    policy: WavePolicy = Field(default_factory=WavePolicy)
    overlays: list[Overlay] = Field(
        default_factory=list, description="As asked for: a waiting rollout applies them later."
    )
    skipped: dict[str, str] = Field(
        default_factory=dict,
        description="Device classes of the release this rollout gives nothing, and why: no "
        "variant, or no registered gateway matching the selector.",
    )
    only_model: str | None = Field(
        None,
        description="Only gateways running this model (a release proposed from field "
        "evidence replaces what the field measured, nothing else): known by the model their "
        "reports name, or by running one of ``only_variants``. None: any gateway.",
    )
    only_variants: list[str] = Field(
        default_factory=list, description="Variants of ``only_model`` known when planned."
    )
    waves: list[list[str]]
    gateways: dict[str, GatewayProgress]
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    wave_index: int = 0
    wave_started_at: datetime | None = None
    status: Literal["waiting", "running", "paused", "completed", "cancelled", "rolled_back"] = (
        "running"
    )
    reason: str = ""
    controls: int = Field(0, ge=0, description="Control requests applied so far.")
    approved_waves: list[int] = Field(
        default_factory=list, description="Waves of ``policy.approval_waves`` approved so far."
    )
    traceparent: str | None = Field(
        None,
        description="W3C trace context of the model's journey (the release it rolls out): "
        "every wave, assignment and announcement of this rollout joins that one trace.",
    )


class WaveFigures(BaseModel):
    """What the gates looked at, for ``decide`` and for ``rollout status``."""

    targets: int
    acknowledged: int = Field(description="Answered the assignment (acknowledged or beyond).")
    applied: int
    failed: int
    silent: int
    rolled_back: int = Field(0, description="Rolled back by a health gate: out of this wave.")
    waiting: int

    @property
    def counted(self) -> int:
        """Gateways that count towards the thresholds (silent and rolled back ones do not)."""
        return self.targets - self.silent - self.rolled_back


class Decision(BaseModel):
    action: Literal["wait", "advance", "complete", "pause", "rollback"]
    reason: str
    figures: WaveFigures
    breached: list[str] = Field(default_factory=list, description="Gateways to roll back.")


def health_breaches(
    state: RolloutState, health: dict[str, HealthAggregate | None]
) -> dict[str, str]:
    """Applied gateways of the current wave whose health on the new model breaks a gate."""
    policy, found = state.policy, {}
    for gateway_id, h in health.items():  # only gateways that reported: not the whole wave
        progress = state.gateways.get(gateway_id)
        if (
            progress is None
            or progress.wave != state.wave_index
            or progress.status != "applied"
            or h is None
            or h.request_count < policy.health_min_requests
        ):
            continue
        reasons = []  # every gate on its own: one passing must not hide another's breach
        if h.error_rate > policy.max_error_rate:
            reasons.append(f"error rate {h.error_rate:.1%} > {policy.max_error_rate:.1%}")
        if h.latency_p95_ms is not None and progress.baseline_p95_ms:
            ratio = h.latency_p95_ms / progress.baseline_p95_ms
            if ratio > policy.max_latency_ratio:
                reasons.append(f"p95 {h.latency_p95_ms:.1f} ms = {ratio:.2f}x the previous "
                               f"model's > {policy.max_latency_ratio:g}x")  # fmt: skip
        if (policy.min_shadow_agreement is not None and h.shadow_agreement is not None
                and h.shadow_agreement < policy.min_shadow_agreement):  # fmt: skip
            reasons.append(f"shadow agreement {h.shadow_agreement:.3f} < "
                           f"{policy.min_shadow_agreement:g}")  # fmt: skip
        if reasons:
            found[gateway_id] = ", ".join(reasons)
    return found


def record(state: RolloutState, report: GatewayReport) -> bool:
    """Fold an applied/failed report of this rollout in; False when it is not ours or stale."""
    progress = state.gateways.get(report.gateway_id)
    if progress is None or report.rollout_id != state.rollout_id:
        return False
    if report.kind not in ("acknowledged", "applied", "failed"):
        return False
    if progress.generation is not None and (report.generation or 0) < progress.generation:
        return False  # about an older assignment
    if report.kind == "acknowledged":  # it received the assignment; the outcome follows
        if progress.status == "assigned":
            progress.status = "acknowledged"
            return True
        return False
    if progress.status == "rolled_back":  # its report about the rollback assignment
        progress.reason = f"rollback {report.kind}" + (
            f": {report.reason}" if report.reason else ""
        )
        return True
    progress.status = report.kind
    progress.reason = report.reason
    return True


def figures(state: RolloutState, now: datetime) -> WaveFigures:
    """The current wave's figures, counted afresh (a live rollout keeps them as counts:
    ``tally.py``)."""
    wave = state.waves[state.wave_index] if state.wave_index < len(state.waves) else []
    cutoff = now - timedelta(seconds=state.policy.silent_timeout_s)
    acknowledged = applied = failed = silent = rolled_back = 0
    gateways = state.gateways
    for gateway_id in wave:  # over waves of up to 100,000: kept tight
        progress = gateways[gateway_id]
        status = progress.status
        if status == "applied":
            applied += 1
        elif status == "failed":
            failed += 1
        elif status == "rolled_back":
            rolled_back += 1
        elif status in WAITING and (at := progress.assigned_at) is not None and at < cutoff:
            silent += 1
        if status not in ("pending", "assigned"):
            acknowledged += 1
    waiting = len(wave) - applied - failed - silent - rolled_back
    return WaveFigures(targets=len(wave), acknowledged=acknowledged, applied=applied,
                       failed=failed, silent=silent, rolled_back=rolled_back,
                       waiting=waiting)  # fmt: skip


def decide(
    state: RolloutState,
    now: datetime,
    health: dict[str, HealthAggregate | None] | None = None,
    known: WaveFigures | None = None,
) -> Decision:
    """The next step for a running rollout's current wave (``health``: each gateway's latest
    aggregates; a breached health gate rolls its gateways back, whatever else holds;
    ``known``: the wave's figures at ``now`` if the caller has them)."""
    f = known or figures(state, now)
    policy = state.policy
    if state.status != "running":
        return Decision(action="wait", reason=f"rollout is {state.status}", figures=f)
    breaches = health_breaches(state, health or {})
    if breaches:
        why = "; ".join(f"{g}: {r}" for g, r in sorted(breaches.items()))
        return Decision(action="rollback", reason=f"wave {state.wave_index} health gate: {why}",
                        figures=f, breached=sorted(breaches))  # fmt: skip
    counted = max(f.counted, 1)
    if f.failed / counted > policy.error_threshold:
        return Decision(
            action="pause",
            reason=f"wave {state.wave_index}: {f.failed} of {f.counted} gateways failed "
            f"({f.failed / counted:.0%} > {policy.error_threshold:.0%})",
            figures=f,
        )
    if f.counted and f.applied / f.counted < policy.success_threshold:
        return Decision(action="wait", reason=f"wave {state.wave_index}: {f.applied} of "
                        f"{f.counted} applied", figures=f)  # fmt: skip
    started = state.wave_started_at or now
    soaked_s = (now - started).total_seconds()
    if soaked_s < policy.soak_s:
        return Decision(action="wait", reason=f"wave {state.wave_index}: soaking "
                        f"{soaked_s:.0f}/{policy.soak_s:g} s", figures=f)  # fmt: skip
    last = state.wave_index + 1 >= len(state.waves)
    following = state.wave_index + 1
    if not last and following in policy.approval_waves and following not in state.approved_waves:
        return Decision(action="wait", reason=f"wave {state.wave_index} done: wave {following} "
                        "waits for approval", figures=f)  # fmt: skip
    return Decision(
        action="complete" if last else "advance",
        reason=f"wave {state.wave_index}: {f.applied} of {f.counted} applied"
        + (f", {f.silent} silent (timed out)" if f.silent else ""),
        figures=f,
    )
