"""Nothing to roll out is never a rollout "completed" (real NATS): a failed release is refused
with its reasons, a rollout reaching no gateway is refused, and an automatic one waits for
gateways - planned in waves once one registers."""

from __future__ import annotations

from typing import Any

import pytest

from slmops.bus import Bus
from slmops.events import GatewayReport, ReleaseCreated, ReleaseFailed, new_event, release_id_for
from slmops.events.payloads import ArtifactRef, ReleaseEntry
from slmops.service.registry_api import RegistryClient
from slmops.testing.events import await_events, stream_count
from slmops_rollout.engine import Engine
from slmops_rollout.handlers import on_gateway_reports, on_release, on_release_failed
from slmops_rollout.plans import WavePolicy
from slmops_rollout.releases import UnknownRelease, find
from slmops_rollout.settings import RolloutSettings
from slmops_rollout.steps import control, tick
from slmops_rollout.targets import NoTargets, NoVariant

pytestmark = [pytest.mark.integration]
ART = ArtifactRef(digest="sha256:" + "a" * 64, size_bytes=1, uri="s3://b/x")
CPU = ReleaseEntry(device_class="cpu", variant_id="v-1", artifact=ART,
                   manifest_digest="sha256:" + "b" * 64, reason="smallest of 1 passed")  # fmt: skip
NPU = ReleaseEntry(device_class="npu", reason="no variant passed validation (qdq: ...)")
RELEASE = ReleaseCreated(release_id="rel-1", model_name="m", version="1", entries=[CPU, NPU])


async def _engine(bus: Bus) -> Engine:
    buckets = [await bus.key_value(b) for b in
               ("slmops-rollouts", "slmops-desired-state", "slmops-gateways")]  # fmt: skip
    return Engine(bus, *buckets, RegistryClient("http://registry.invalid"))


def _engines(engine: Engine) -> Any:
    async def engines() -> Engine:
        return engine

    return engines


def _registered(gateway_id: str, device_class: str = "cpu") -> Any:
    report = GatewayReport(gateway_id=gateway_id, kind="registered", device_class=device_class)
    return new_event(report, source="/test")


async def test_a_failed_release_and_an_unknown_one_are_told_apart(bus: Bus) -> None:
    # setup: the rollout service takes in a failed release of m 2
    engine = await _engine(bus)
    failed = ReleaseFailed(release_id=release_id_for("m", "2"), model_name="m", version="2",
                           entries=[NPU])  # fmt: skip
    await on_release_failed(new_event(failed, source="/test"), _engines(engine))

    # execute / assert: m 2 is refused with the reason per class; m 3 is unknown
    with pytest.raises(NoVariant, match="m 2 has no release to roll out") as refused:
        await find(engine.rollouts, "m", "2")
    assert refused.value.reasons == {"npu": "no variant passed validation (qdq: ...)"}
    with pytest.raises(UnknownRelease, match="no release of m 3 yet"):
        await find(engine.rollouts, "m", "3")


async def test_a_rollout_reaching_no_gateway_is_refused_and_nothing_is_recorded(bus: Bus) -> None:
    # setup: one gateway, of the class without a variant
    engine = await _engine(bus)
    await on_gateway_reports([_registered("n1", "npu")], _engines(engine))

    # execute
    with pytest.raises(NoTargets) as refused:
        await engine.start(RELEASE, {}, WavePolicy())

    # assert: the reason per class; no rollout, nothing announced
    assert refused.value.reasons == {
        "cpu": "no gateway of class cpu is registered",
        "npu": "no variant: no variant passed validation (qdq: ...)",
    }
    assert await engine.all() == []
    assert await engine.store.ids() == []
    assert await stream_count(bus, "SLMOPS_ROLLOUT") == 0


async def test_an_automatic_rollout_waits_for_gateways_then_rolls_out_in_waves(bus: Bus) -> None:
    # setup: automatic rollouts of every model; no gateway registered yet
    engine = await _engine(bus)
    settings = RolloutSettings(auto_models=["*"])

    # execute: the release arrives before the fleet
    await on_release(new_event(RELEASE, source="/test"), _engines(engine), settings)
    await tick(engine)
    (waiting,) = await engine.all()
    then = (waiting.status, waiting.reason, dict(waiting.skipped))
    announced_while_waiting = await stream_count(bus, "SLMOPS_ROLLOUT")
    # a gateway of its class registers (not handed the model directly: the waves take it)
    await on_gateway_reports([_registered("c1")], _engines(engine))
    direct = await stream_count(bus, "SLMOPS_ROLLOUT")
    await tick(engine)
    started = await await_events(bus, "slmops.rollout.started.v1", count=1)
    assigned = await await_events(bus, "slmops.gateway.assignment.v1.>", count=1)

    # assert: waiting said why, announced nothing; then planned over the fleet as it is now
    assert then[0] == "waiting"
    assert "no gateway of class cpu is registered" in then[1]
    assert then[2] == {"cpu": "no gateway of class cpu is registered",
                       "npu": "no variant: no variant passed validation (qdq: ...)"}  # fmt: skip
    assert (announced_while_waiting, direct) == (0, 0)
    assert waiting.status == "running"  # the same rollout, started
    assert waiting.waves == [["c1"]]
    assert started[0].data.rollout_id == waiting.rollout_id
    assert assigned[0].data.gateway_id == "c1"
    assert assigned[0].data.desired.variant_id == "v-1"
    assert waiting.skipped == {"npu": "no variant: no variant passed validation (qdq: ...)"}
    reloaded = await Engine(bus, engine.rollouts, engine.desired, engine.gateways.kv,
                            engine.registry).get(waiting.rollout_id)  # fmt: skip
    assert reloaded is not None
    assert (reloaded.status, reloaded.waves) == ("running", [["c1"]])


async def test_a_waiting_rollout_can_be_cancelled(bus: Bus) -> None:
    engine = await _engine(bus)
    state = await engine.start(RELEASE, {}, WavePolicy(), wait=True)

    cancelled = await control(engine, state.rollout_id, "cancel", "wrong fleet")
    await on_gateway_reports([_registered("c1")], _engines(engine))
    await tick(engine)

    assert (cancelled.status, cancelled.reason) == ("cancelled", "wrong fleet")
    assert cancelled.waves == []
    assert await stream_count(bus, "SLMOPS_ROLLOUT") == 0
