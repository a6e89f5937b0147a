"""The rollout service's metric families: rollouts by state, gateways by running version, the
reports it receives - from the engine's memory, never labelled by gateway or variant."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slmops.events import CloudEvent, GatewayReport, new_event
from slmops.events.payloads import ArtifactRef, DesiredModel
from slmops.service.metrics import ServiceMetrics
from slmops_rollout.fleet import GatewayRecord
from slmops_rollout.metrics import register
from slmops_rollout.state import RolloutState

ART = ArtifactRef(digest="sha256:" + "a" * 64, size_bytes=1, uri="s3://b/x")


def _desired(version: str, variant_id: str) -> DesiredModel:
    return DesiredModel(model_name="m", version=version, variant_id=variant_id,
                        manifest_digest="sha256:" + "b" * 64, artifact=ART)  # fmt: skip


def _rollout(rollout_id: str, version: str, status: str) -> RolloutState:
    return RolloutState(
        rollout_id=rollout_id,
        release_id=f"rel-{version}",
        model_name="m",
        version=version,
        desired={"cpu": _desired(version, f"v-{version}")},
        waves=[],
        gateways={},
        status=status,
    )  # type: ignore[arg-type]


@dataclass
class FakeFleet:
    records: list[GatewayRecord]

    async def all(self) -> list[GatewayRecord]:
        return self.records


@dataclass
class FakeEngine:
    rollouts: list[RolloutState]
    gateways: FakeFleet = field(default_factory=lambda: FakeFleet([]))

    async def all(self) -> list[RolloutState]:
        return self.rollouts


async def test_rollouts_by_state_and_gateways_by_the_version_they_run() -> None:
    running = [GatewayRecord(gateway_id=f"gw-{i}", device_class="cpu", running_variant_id="v-2")
               for i in range(3)]  # fmt: skip
    engine = FakeEngine(
        [_rollout("ro-1", "1", "completed"), _rollout("ro-2", "2", "running")],
        FakeFleet([*running,
                   GatewayRecord(gateway_id="gw-new", device_class="cpu"),
                   GatewayRecord(gateway_id="gw-odd", device_class="npu",
                                 running_variant_id="v-by-hand")]),
    )  # fmt: skip

    async def engines() -> Any:
        return engine

    metrics = ServiceMetrics("rollout")
    register(metrics, engines)
    text = (await metrics.render()).decode()
    value = metrics.registry.get_sample_value

    assert value("slmops_rollouts", {"state": "completed"}) == 1
    assert value("slmops_rollouts", {"state": "running"}) == 1
    assert value("slmops_rollouts", {"state": "paused"}) == 0
    version_2 = {"model": "m", "version": "2", "device_class": "cpu"}
    assert value("slmops_gateways", version_2) == 3
    assert (
        value("slmops_gateways", {"model": "none", "version": "none", "device_class": "cpu"}) == 1
    )
    unknown = {"model": "unknown", "version": "unknown", "device_class": "npu"}
    assert value("slmops_gateways", unknown) == 1
    assert "gw-" not in text
    assert "v-2" not in text


async def test_reports_received_are_counted_by_kind_before_the_handler() -> None:
    handled: list[str] = []

    async def fold(events: list[CloudEvent[Any]]) -> None:
        handled.extend(e.data.kind for e in events)

    async def engines() -> Any:
        return None  # not connected: the collector exports zeros

    metrics = ServiceMetrics("rollout")
    handler = register(metrics, engines)(fold)
    batch = [
        new_event(GatewayReport(gateway_id="gw-1", kind=kind, device_class="cpu"), source="/test")  # type: ignore[arg-type]
        for kind in ("registered", "applied", "applied")
    ]
    await handler(batch)

    value = metrics.registry.get_sample_value
    assert handled == ["registered", "applied", "applied"]
    assert value("slmops_gateway_reports_received_total", {"kind": "applied"}) == 2
    assert value("slmops_gateway_reports_received_total", {"kind": "registered"}) == 1
    await metrics.render()
    assert value("slmops_rollouts", {"state": "running"}) == 0
