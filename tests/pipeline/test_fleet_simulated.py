"""Rollouts over a simulated fleet (real NATS, moto S3, registry, rollout service): 240
gateways of two classes run the real agent code path - reconcile, acknowledge, verify the
registry's signatures and their class's validation report, report - with injected faults."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from slmops.bus import Bus
from slmops.testing.events import await_events, stream_count
from slmops.testing.models import with_word_tokenizer
from slmops_gateway.simulator import FleetSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CLASSES = {"test-cpu": 0.5, "test-arm": 0.5}


async def test_a_rollout_over_240_simulated_gateways_of_two_classes_completes(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: a release with one variant per class; 240 gateways over two sites, 2 whose
    # downloads fail, 2 that go silent after registering
    spec = FleetSpec(count=240, classes=CLASSES, labels={"site": ["berlin", "paris"]},
                     faults={"download": 2 / 240, "silent": 2 / 240})  # fmt: skip
    variants = await pipeline.release(bus, with_word_tokenizer(tiny_onnx()), CLASSES)
    async with (
        pipeline.rollout_service() as api,
        pipeline.simulated_fleet(bus, spec) as fleet,
    ):
        await pipeline.await_fleet(api, 240)

        # execute: 5% canary, 25%, all; failures tolerated up to 20% per wave
        policy = {"percents": [5, 25, 100], "soak_s": 0.3, "silent_timeout_s": 8,
                  "success_threshold": 0.9, "error_threshold": 0.2}  # fmt: skip
        started = await api.post("/v1/rollouts", json={
            "model_name": "tiny", "version": "1.0.0", "policy": policy,
            "overlays": [{"selector": {"site": "paris"}, "settings": {"intra_op_threads": 2}}],
        })  # fmt: skip
        assert started.status_code == 201, started.text
        done = await await_events(bus, "slmops.rollout.completed.v1", count=1, timeout_s=120)

        # assert: the rollout's counts are the fleet's; each class serves its own variant;
        # the overlay reached the paris gateways only; failures say why
        rollout_id = started.json()["rollout_id"]
        assert (done[0].data.gateways_updated, done[0].data.gateways_failed,
                done[0].data.gateways_silent) == (236, 2, 2)  # fmt: skip
        wave_subject = "slmops.rollout.wave.started.v1"  # every announcement, duplicates too
        announced = await stream_count(bus, "SLMOPS_ROLLOUT", wave_subject)
        waves = await await_events(bus, wave_subject, count=announced)
        counts = [w.data.target_count for w in waves]  # 5 % and 25 %, rounded up to whole cohorts
        assert sum(counts) == 240, counts
        assert 12 <= counts[0] < 15, counts
        assert 60 <= counts[0] + counts[1] < 63, counts
        for sim in fleet.gateways.values():
            active = sim.agent.slots.active
            if sim.fault is None:
                assert active is not None, sim.agent.settings.gateway_id
                assert active.variant_id == variants[sim.agent.settings.device_class].variant_id
                threads = 2 if sim.agent.settings.labels["site"] == "paris" else 1
                assert active.options.intra_op_threads == threads
            else:
                assert active is None
        failed = await await_events(
            bus, "slmops.gateway.report.v1.>", count=2,
            where=lambda e: e.data.kind == "failed" and e.data.rollout_id == rollout_id,
        )  # fmt: skip
        assert all("connection reset (simulated fault)" in e.data.reason for e in failed)
        status = (await api.get(f"/v1/rollouts/{rollout_id}")).json()
        assert status["gateways"] == {"applied": 236, "failed": 2, "assigned": 2}
        assert [w["targets"] for w in status["wave_progress"]] == counts

        # a late joiner: five new gateways register after the rollout completed and get
        # their class's variant of it
        late = FleetSpec(count=5, classes=CLASSES, prefix="late", seed=1)
        async with pipeline.simulated_fleet(bus, late) as newcomers:
            for _ in range(100):
                if "-" not in newcomers.serving():
                    break
                await asyncio.sleep(0.1)
            for sim in newcomers.gateways.values():
                active = sim.agent.slots.active
                assert active is not None, sim.agent.settings.gateway_id
                assert active.variant_id == variants[sim.agent.settings.device_class].variant_id


async def test_health_faults_on_the_new_model_roll_back_exactly_those_gateways(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: 40 gateways run 1.0.0 and report healthy baselines; on any later model four
    # get 10x slower, two disagree with the previous model, and two fail every smoke test
    spec = FleetSpec(count=40, classes={"test-cpu": 1.0}, prefix="hf",
                     faults={"latency": 0.1, "shadow": 0.05, "smoke": 0.05})  # fmt: skip
    base = with_word_tokenizer(tiny_onnx())
    old = await pipeline.release(bus, base, ["test-cpu"], "1.0.0")
    new = await pipeline.release(bus, with_word_tokenizer(tiny_onnx(seed=4)), ["test-cpu"],
                                 "1.1.0")  # fmt: skip
    async with pipeline.rollout_service() as api, pipeline.simulated_fleet(bus, spec) as fleet:
        await pipeline.await_fleet(api, 40)
        body = {"model_name": "tiny", "version": "1.0.0",
                "policy": {"percents": [100], "soak_s": 0, "error_threshold": 0.1}}  # fmt: skip
        assert (await api.post("/v1/rollouts", json=body)).status_code == 201
        await await_events(bus, "slmops.rollout.completed.v1", count=1, timeout_s=60)
        await fleet.report_health(30.0)
        for _ in range(100):
            records = (await api.get("/v1/gateways")).json()
            if sum(1 for r in records if r["health"]) == 38:  # all but the two smoke failures
                break
            await asyncio.sleep(0.1)

        # execute: roll out 1.1.0 with latency and shadow gates; the fleet reports health
        policy = {"percents": [100], "soak_s": 30, "error_threshold": 0.1,
                  "max_latency_ratio": 1.5, "min_shadow_agreement": 0.9}  # fmt: skip
        started = await api.post("/v1/rollouts", json={
            "model_name": "tiny", "version": "1.1.0", "policy": policy})  # fmt: skip
        rollout_id = started.json()["rollout_id"]
        await await_events(
            bus, "slmops.gateway.report.v1.applied.>", count=38, timeout_s=60,
            where=lambda e: e.data.rollout_id == rollout_id,
        )  # fmt: skip
        await fleet.report_health(30.0)
        rolled = await await_events(bus, "slmops.rollout.rolled_back.v1", count=1, timeout_s=30)

        # assert: exactly the degraded gateways went back (signed) to 1.0.0; the rest stay
        degraded = sorted(g for g, s in fleet.gateways.items() if s.fault in ("latency", "shadow"))
        assert sorted(rolled[0].data.gateway_ids) == degraded
        assert rolled[0].data.to_variant_id == old["test-cpu"].variant_id
        assert "shadow agreement 0.800 < 0.9" in rolled[0].data.reason
        assert "10.00x the previous model's > 1.5x" in rolled[0].data.reason
        for _ in range(100):
            if fleet.serving().get(old["test-cpu"].variant_id) == len(degraded):
                break
            await asyncio.sleep(0.1)
        assert fleet.serving() == {old["test-cpu"].variant_id: 6, new["test-cpu"].variant_id: 32,
                                   "-": 2}  # fmt: skip
        status = (await api.get(f"/v1/rollouts/{rollout_id}")).json()
        assert (status["status"], status["gateways"]) == (
            "paused", {"applied": 32, "rolled_back": 6, "failed": 2})  # fmt: skip
