"""The bounded field loop on a real nats-server: one open re-optimization per model and class,
a redelivered finding replays the same plan under the same ids, the proposal's release closes
it, and a cooldown passes before the next. The registry is a stand-in that has every candidate
stored already, so each job is a reuse (no compute), announced again for the proposal."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from slmops.bus import Bus
from slmops.events import (
    FleetRegressionDetected,
    ReleaseFailed,
    derive_event_id,
    field_release_id,
    new_event,
    variant_id_for,
)
from slmops.events.payloads import ArtifactRef, FieldWindow, GateResult, Recipe
from slmops.profiles import load_profiles
from slmops.reports import CheckOutcome, ValidationReport
from slmops.settings import PlatformSettings
from slmops.testing.events import await_events, stream_count
from slmops_optimizer.compute import Compute
from slmops_optimizer.context import JOBS_BUCKET, OptimizerContext
from slmops_optimizer.reopt_handlers import on_fleet_regression, on_proposal_decided
from slmops_optimizer.reopt_state import Bounds, Reoptimization, ReoptimizationLoop
from slmops_optimizer.settings import OptimizerSettings

pytestmark = [pytest.mark.integration]

PROFILES = Path(__file__).resolve().parents[3] / "deploy" / "profiles"
T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
PARENT = ArtifactRef(digest="sha256:" + "cd" * 32, size_bytes=1000, uri="s3://b/blobs/p")
PLANNED = "slmops.optimization.planned.v1"


@dataclass
class StandInRegistry:
    """The registry's answers: a published encoder, every variant stored, some reports."""

    recipes: dict[str, Recipe]  # variant id -> recipe
    latency_ms: dict[str, float] = field(default_factory=dict)  # variant id -> host p95
    field_ms: dict[str, float] = field(default_factory=dict)  # variant id -> the Pi's p95

    async def model_version(self, name: str, version: str) -> dict[str, Any]:
        manifest = {"model_name": name, "version": version, "format": "onnx",
                    "task": "feature-extraction",
                    "artifact": PARENT.model_dump(mode="json")}  # fmt: skip
        return {"manifest": manifest, "digest": "sha256:" + "ee" * 32}

    async def variant(self, variant_id: str) -> dict[str, Any] | None:
        artifact = {"digest": "sha256:" + variant_id[2:].ljust(64, "0")[:64], "size_bytes": 10,
                    "uri": "s3://b/v"}  # fmt: skip
        recipe = self.recipes.get(variant_id, Recipe(name="other", passes=[]))
        manifest = {"artifact": artifact, "recipe": recipe.model_dump(mode="json"),
                    "metrics": {"size_mb": 1.0, "duration_s": 2.0}}  # fmt: skip
        return {"manifest": manifest, "digest": "sha256:" + "aa" * 32}

    async def variant_field(self, variant_id: str) -> dict[str, Any] | None:
        if variant_id not in self.field_ms:
            return None
        figures = {"latency_p95_ms": self.field_ms[variant_id]}
        measured = {"device_class": "arm64-pi5", "figures": figures}
        return {"classes": [{"device_class": "arm64-pi5", "measured": measured}]}

    async def variant_report(self, variant_id: str) -> dict[str, Any] | None:
        if variant_id not in self.latency_ms:
            return None
        gate = GateResult(name="latency.p95_ms", value=self.latency_ms[variant_id], unit="ms")
        report = ValidationReport(
            model_name="enc", version="1.0.0", variant_id=variant_id, device_class="c",
            recipe_name="r", verdict="passed", candidate=PARENT, started_at=T0, duration_s=1,
            checks=[CheckOutcome(name="latency", gates=[gate])],
        )  # fmt: skip
        return {"report": report.model_dump(mode="json", by_alias=True)}


@dataclass
class Runtime:
    bus: Bus

    async def key_value(self, bucket: str) -> Any:
        return await self.bus.key_value(bucket)


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


def _variant(profile: str, recipe: str) -> tuple[str, Recipe]:
    found = next(r for r in load_profiles(PROFILES)[profile].recipes if r.name == recipe).recipe()
    return variant_id_for(PARENT.digest, found, profile), found


def _context(bus: Bus, tmp_path: Path, registry: StandInRegistry, clock: Clock) -> Any:
    settings = OptimizerSettings(platform=PlatformSettings(), work_dir=tmp_path,
                                 reoptimize_cooldown_s=600)  # fmt: skip
    ctx = OptimizerContext(settings=settings, profiles=load_profiles(PROFILES),
                           compute=Compute(settings), registry=registry,  # type: ignore[arg-type]
                           runtime=Runtime(bus), clock=clock)  # type: ignore[arg-type]  # fmt: skip
    ctx.decisions = []  # type: ignore[attr-defined]
    ctx.count_finding = ctx.decisions.append  # type: ignore[attr-defined]
    return ctx


def _finding(variant_id: str, detection_id: str, **fields: Any) -> Any:
    values = {"detection_id": detection_id, "model_name": "enc", "version": "1.0.0",
              "variant_id": variant_id, "device_class": "arm64-pi5",
              "windows": [FieldWindow(start=T0, window_s=30, gateways=4, requests=400,
                                      value=400.0)],
              "metric": "latency_p95_ms", "bound": "max", "budget": 250.0, "field_value": 400.0,
              **fields}  # fmt: skip
    return new_event(FleetRegressionDetected(**values), source="/slmops/telemetry",
                     event_id=derive_event_id("test.finding", detection_id))  # fmt: skip


async def _planned(bus: Bus, count: int) -> list[Any]:
    return await await_events(bus, PLANNED, count=count)


async def test_one_open_per_class_replayed_on_redelivery_closed_by_its_release_then_cooled(
    bus: Bus, tmp_path: Path
) -> None:
    # setup: int8-dynamic regressed on the Pi class; int4 weight-only measured 0.5x on the host
    regressed, regressed_recipe = _variant("arm64-pi5", "int8-dynamic-per-channel")
    int4, int4_recipe = _variant("arm64-pi5", "int4-weight-only")
    int8wo, int8wo_recipe = _variant("arm64-pi5", "int8-weight-only")
    registry = StandInRegistry(
        recipes={regressed: regressed_recipe, int4: int4_recipe, int8wo: int8wo_recipe},
        latency_ms={regressed: 100.0, int4: 50.0, int8wo: 120.0},
    )
    clock = Clock()
    ctx = _context(bus, tmp_path, registry, clock)
    first = _finding(regressed, "det-1")

    # execute: the finding, its redelivery, another finding for the class while it is open
    await on_fleet_regression(first, ctx)
    await on_fleet_regression(first, ctx)
    await on_fleet_regression(_finding(regressed, "det-2"), ctx)

    # assert: one plan for one proposal, the field evidence decides (int8 wo measured slower)
    release_id = field_release_id("enc", "1.0.0", "det-1")
    (plan,) = await _planned(bus, 1)
    assert plan.id == derive_event_id("optimization.planned", release_id)
    assert (plan.data.release_id, plan.data.field) == (release_id, first.data.evidence())
    assert [j.variant_id for j in plan.data.jobs] == [int4]
    done = await await_events(bus, "slmops.optimization.completed.v1", count=1)
    assert done[0].id == derive_event_id("optimization.outcome", release_id, int4)
    assert (done[0].data.release_id, done[0].data.field) == (release_id, first.data.evidence())
    assert await stream_count(bus, "SLMOPS_PIPELINE", PLANNED) == 1
    assert await stream_count(bus, "SLMOPS_PIPELINE", "slmops.optimization.completed.v1") == 1
    assert ctx.decisions == ["open", "replay", "busy"]

    # the proposal fails; a finding within the cooldown is ignored, the same one too
    proposal = ReleaseFailed(release_id=release_id, model_name="enc", version="1.0.0",
                             entries=[], proposal=first.data.evidence())  # fmt: skip
    await on_proposal_decided(new_event(proposal, source="/slmops/validator"), ctx)
    clock.now = T0 + timedelta(seconds=599)
    await on_fleet_regression(_finding(regressed, "det-3"), ctx)
    await on_fleet_regression(first, ctx)
    assert ctx.decisions[3:] == ["cooling", "decided"]

    # after the cooldown the next finding is planned, as a proposal of its own
    clock.now = T0 + timedelta(seconds=601)
    await on_fleet_regression(_finding(regressed, "det-4"), ctx)
    plans = await _planned(bus, 2)
    assert plans[1].data.release_id == field_release_id("enc", "1.0.0", "det-4")
    assert ctx.decisions[5:] == ["open"]


async def test_nothing_that_could_meet_the_budget_is_an_empty_plan_with_the_reason(
    bus: Bus, tmp_path: Path
) -> None:
    # setup: the class's other recipes: one slower on the host than the regressed variant, the
    # other measured by the Pi devices themselves (an earlier rollout) above the budget
    regressed, regressed_recipe = _variant("arm64-pi5", "int4-weight-only")
    int8wo, int8wo_recipe = _variant("arm64-pi5", "int8-weight-only")
    dynamic, dynamic_recipe = _variant("arm64-pi5", "int8-dynamic-per-channel")
    registry = StandInRegistry(
        {regressed: regressed_recipe, int8wo: int8wo_recipe, dynamic: dynamic_recipe},
        latency_ms={regressed: 80.0, int8wo: 95.0},
        field_ms={dynamic: 300.0},
    )
    ctx = _context(bus, tmp_path, registry, Clock())

    await on_fleet_regression(_finding(regressed, "det-9"), ctx)

    (plan,) = await _planned(bus, 1)
    assert plan.data.jobs == []
    reason = plan.data.skipped["arm64-pi5"]
    assert reason.startswith("no recipe left that could meet latency_p95_ms <= 250 in the field")
    assert f"int8-weight-only: no better than {regressed} (x1.19, latency.p95_ms on" in reason
    assert (
        "int8-dynamic-per-channel: measured 300 in the field (x0.75, measured by the "
        "arm64-pi5 devices)"
    ) in reason
    assert plan.data.release_id == field_release_id("enc", "1.0.0", "det-9")


async def test_two_instances_racing_for_one_class_open_it_once(bus: Bus) -> None:
    import asyncio

    loop = ReoptimizationLoop(await bus.key_value(JOBS_BUCKET), Bounds(60, 3600))

    def opening(detection_id: str) -> Reoptimization:
        return Reoptimization(model_name="enc", device_class="arm64-pi5",
                              detection_id=detection_id,
                              release_id=f"rel-{detection_id}")  # fmt: skip

    results = await asyncio.gather(*(loop.begin(opening(f"d{i}"), T0) for i in range(6)))

    decisions = sorted(d for d, _ in results)
    assert decisions == ["busy"] * 5 + ["open"]
    stored = await loop.get("enc", "arm64-pi5")
    assert stored is not None
    assert stored.opened_at == T0
    assert all(entry.detection_id == stored.detection_id for _, entry in results)


def test_an_open_entry_nothing_closed_is_given_up_after_its_maximum() -> None:
    from slmops_optimizer.reopt_state import decide

    bounds = Bounds(cooldown_s=600, open_max_s=3600)
    open_one = Reoptimization(detection_id="d1", opened_at=T0)

    assert decide(open_one, "d2", T0 + timedelta(seconds=3599), bounds) == "busy"
    assert decide(open_one, "d2", T0 + timedelta(seconds=3601), bounds) == "open"
    assert decide(open_one, "d1", T0 + timedelta(seconds=9999), bounds) == "replay"
    assert decide(None, "d1", T0, bounds) == "open"
