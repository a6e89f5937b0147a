"""`slmops demo --feedback`: the loop closed on the demo's own fleet, followed from the events.

The simulated fleet runs one class slower in the field than the validator's host measured (and
may serve another class shifted inputs). After the rollouts, the demo keeps the gateways
reporting and shows what the platform does by itself: the telemetry service folds the reports
and finds the regression (and the drift), the optimizer plans candidates for that class, the
validator judges them against the field's figure and proposes a release. The demo approves it
as an operator would (`POST /v1/proposals/{id}/approve`), follows its rollout and reads the
class's field figures again from the telemetry API. A proposal that found no candidate ends the
loop with the validator's reasons: nothing rolls out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console

from slmops.bus import Bus
from slmops.events import (
    CloudEvent,
    EventDecodeError,
    FleetDriftDetected,
    FleetRegressionDetected,
    OptimizationPlanned,
    ReleaseCreated,
    ReleaseFailed,
    RolloutCompleted,
    RolloutRolledBack,
    RolloutStarted,
    ValidationFailed,
    ValidationPassed,
    decode_event,
)
from slmops.fleetsim import SimulatedFleet

_SUBJECTS = ("slmops.fleet.>", "slmops.optimization.planned.>", "slmops.validation.>",
             "slmops.release.>", "slmops.rollout.>")  # fmt: skip


@dataclass
class FieldLoop:
    """What the platform did about the field, folded from its events (one model version)."""

    model_name: str
    version: str
    regressions: list[FleetRegressionDetected] = field(default_factory=list)
    drifts: list[FleetDriftDetected] = field(default_factory=list)
    plans: dict[str, OptimizationPlanned] = field(default_factory=dict)  # release id -> plan
    judged: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> verdict, gate
    proposals: dict[str, ReleaseCreated | ReleaseFailed] = field(default_factory=dict)
    rollouts: dict[str, str] = field(default_factory=dict)  # release id -> rollout id
    outcomes: dict[str, str] = field(default_factory=dict)  # rollout id -> outcome
    news: list[str] = field(default_factory=list)

    def fold(self, event: CloudEvent[Any]) -> None:
        data = event.data
        ours = (getattr(data, "model_name", None), getattr(data, "version", None))
        if isinstance(data, RolloutStarted | RolloutCompleted | RolloutRolledBack):
            self._rollout(data)
        elif ours != (self.model_name, self.version):
            return
        elif isinstance(data, FleetRegressionDetected):
            self.regressions.append(data)
            host = "not measurable on the host" if data.host_value is None else (
                f"host measured {data.host_value:.4g}")  # fmt: skip
            self.news.append(f"field: {data.device_class} {data.metric} {data.field_value:.4g} "
                             f"over {len(data.windows)} windows against a budget of "
                             f"{data.budget:.4g} ({host}): regression detected")  # fmt: skip
        elif isinstance(data, FleetDriftDetected):
            self.drifts.append(data)
            self.news.append(f"field: {data.device_class} served inputs moved from the "
                             f"validation baseline ({data.signal} score {data.score:.2f} > "
                             f"{data.threshold:g}): drift detected")  # fmt: skip
        elif isinstance(data, OptimizationPlanned) and data.field is not None:
            self.plans[data.release_id or ""] = data
            recipes = ", ".join(j.recipe_name for j in data.jobs) or "none"
            skipped = "; ".join(data.skipped.values())
            self.news.append(
                f"optimizer: re-optimization for {data.field.device_class}: "
                f"candidates {recipes}" + (f" ({skipped})" if skipped else "")
            )
        elif isinstance(data, ValidationPassed | ValidationFailed):
            self._judged(data)
        elif isinstance(data, ReleaseCreated | ReleaseFailed) and data.proposal is not None:
            self.proposals[data.release_id] = data
            if isinstance(data, ReleaseCreated):
                chosen = next((e for e in data.entries if e.variant_id), None)
                self.news.append(
                    f"validator: proposed release {data.release_id} for "
                    f"{data.proposal.device_class}: {chosen.reason if chosen else ''}"
                )
            else:
                why = "; ".join(f"{e.device_class}: {e.reason}" for e in data.entries)
                self.news.append(f"validator: no candidate meets the field budget ({why}): "
                                 "nothing rolls out")  # fmt: skip

    def _judged(self, data: ValidationPassed | ValidationFailed) -> None:
        planned = {j.variant_id: j.recipe_name for p in self.plans.values() for j in p.jobs}
        if data.variant_id not in planned:
            return
        gate = next((g for g in data.gates if g.name.startswith("field.")), None)
        verdict = "passed" if isinstance(data, ValidationPassed) else "failed"
        self.judged[data.variant_id] = {
            "verdict": verdict,
            "recipe": planned[data.variant_id],
            "field_gate": gate.model_dump() if gate else None,
        }
        detail = gate.detail if gate is not None else getattr(data, "reason", "")
        self.news.append(f"validator: candidate {planned[data.variant_id]} {verdict}: {detail}")

    def _rollout(self, data: RolloutStarted | RolloutCompleted | RolloutRolledBack) -> None:
        if isinstance(data, RolloutStarted):
            if data.release_id in self.proposals:
                self.rollouts[data.release_id] = data.rollout_id
            return
        if data.rollout_id in self.rollouts.values():
            outcome = "completed" if isinstance(data, RolloutCompleted) else "rolled back"
            self.outcomes[data.rollout_id] = outcome
            self.news.append(f"rollout {data.rollout_id} of the proposal: {outcome}")


@contextlib.asynccontextmanager
async def watching(bus: Bus, loops: list[FieldLoop]) -> AsyncIterator[list[FieldLoop]]:
    """Fold every event into ``loops`` while inside (subscribe before the rollouts: a finding
    may come while their waves are still going)."""

    async def on_message(msg: Any) -> None:
        with contextlib.suppress(EventDecodeError):
            event = decode_event(msg.data)
            for loop in loops:
                loop.fold(event)

    subscriptions = [await bus.nc.subscribe(subject, cb=on_message) for subject in _SUBJECTS]
    try:
        yield loops
    finally:
        for subscription in subscriptions:
            await subscription.unsubscribe()


@dataclass
class FeedbackSettings:
    rollout_url: str
    telemetry_url: str
    health_interval_s: float = 3.0
    timeout_s: float = 900.0
    policy: dict[str, Any] = field(
        default_factory=lambda: {"percents": [50.0, 100.0], "soak_s": 1.0, "silent_timeout_s": 30.0}
    )


async def follow_loops(
    loops: list[FieldLoop], fleet: SimulatedFleet, settings: FeedbackSettings,
    console: Console, auth: httpx.Auth,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Keep the fleet reporting until the loops have an outcome - every regression's proposal
    rolled out (then its class's field figures read back) or found nothing - or the timeout.
    A model whose figures break no budget has nothing to settle."""
    deadline = time.monotonic() + settings.timeout_s
    approved: set[str] = set()
    async with httpx.AsyncClient(timeout=30.0, auth=auth) as http:
        while time.monotonic() < deadline:
            await fleet.report_health(settings.health_interval_s)
            for loop in loops:
                for line in loop.news:
                    console.print(line, markup=False, highlight=False)
                loop.news.clear()
                for release_id, release in loop.proposals.items():
                    if isinstance(release, ReleaseCreated) and release_id not in approved:
                        approved.add(release_id)
                        await _approve(http, settings, release_id, console)
            if any(loop.regressions for loop in loops) and all(map(_settled, loops)):
                break
            await asyncio.sleep(settings.health_interval_s)
        else:
            console.print(f"the field loop had no outcome within {settings.timeout_s:.0f} s "
                          "(the optimizer re-optimizes a model's class once per "
                          "SLMOPS_OPTIMIZER_REOPTIMIZE_COOLDOWN_S: an earlier run's may hold "
                          "it; `slmops fleet health` shows the figures)", markup=False)  # fmt: skip
        # the recovered figures need complete windows of the new variants: a few more rounds
        return {loop.model_name: summary(loop, await _figures_after(loop, fleet, settings, http))
                for loop in loops}  # fmt: skip


def _settled(loop: FieldLoop) -> bool:
    """Every finding's re-optimization decided, every proposal's rollout over."""
    # one re-optimization per model and class at a time: a second finding on a class (its
    # TTFT after its decode speed) is answered by the one plan
    planned = {p.field.device_class for p in loop.plans.values() if p.field is not None}
    if {r.device_class for r in loop.regressions} - planned:
        return False  # the optimizer has not answered a finding (yet)
    if set(loop.plans) - set(loop.proposals):
        return False
    rolled = [r for r in loop.proposals.values() if isinstance(r, ReleaseCreated)]
    return all(loop.rollouts.get(r.release_id) in loop.outcomes for r in rolled)


async def _approve(
    http: httpx.AsyncClient, settings: FeedbackSettings, release_id: str, console: Console
) -> None:
    body = {"policy": settings.policy, "reason": "slmops demo --feedback: approved as operator"}
    answer = await http.post(f"{settings.rollout_url}/v1/proposals/{release_id}/approve",
                             json=body)  # fmt: skip
    if answer.is_success:
        rollout = answer.json().get("rollout") or {}
        console.print(f"operator: approved {release_id}: rollout {rollout.get('rollout_id')}",
                      markup=False)  # fmt: skip
    else:
        console.print(f"operator: approving {release_id} was refused: {answer.text}",
                      markup=False)  # fmt: skip


async def _figures_after(
    loop: FieldLoop, fleet: SimulatedFleet, settings: FeedbackSettings, http: httpx.AsyncClient
) -> list[dict[str, Any]]:
    """The version's field figures per (variant, class) once every variant a completed
    proposal rolled out has complete windows of its own (at most ~a minute more)."""
    wanted = {e.variant_id for r in loop.proposals.values() if isinstance(r, ReleaseCreated)
              and loop.outcomes.get(loop.rollouts.get(r.release_id, "")) == "completed"
              for e in r.entries if e.variant_id}  # fmt: skip
    url = f"{settings.telemetry_url}/v1/fleet/health/{loop.model_name}/{loop.version}"
    rows: list[dict[str, Any]] = []
    for _ in range(40):
        answer = await http.get(url, params={"last": 2})
        rows = answer.json() if answer.is_success else []
        seen = {r["variant_id"] for r in rows if r.get("windows", 0) >= 2}
        if wanted <= seen:
            break
        await fleet.report_health(settings.health_interval_s)
        await asyncio.sleep(settings.health_interval_s)
    return rows


def summary(loop: FieldLoop, figures: list[dict[str, Any]]) -> dict[str, Any]:
    """The loop for the demo's report (JSON-able)."""
    return {
        "regressions": [r.model_dump(mode="json") for r in loop.regressions],
        "drifts": [d.model_dump(mode="json") for d in loop.drifts],
        "plans": {k: p.model_dump(mode="json") for k, p in loop.plans.items()},
        "candidates": loop.judged,
        "proposals": {k: {"outcome": "proposed" if isinstance(r, ReleaseCreated) else "failed",
                          **r.model_dump(mode="json")} for k, r in loop.proposals.items()},
        "rollouts": {k: {"rollout_id": v, "outcome": loop.outcomes.get(v)}
                     for k, v in loop.rollouts.items()},
        "field_figures": figures,
    }  # fmt: skip
