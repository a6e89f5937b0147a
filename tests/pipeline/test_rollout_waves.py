"""A staged rollout to real gateway agents (real NATS, moto S3, registry, ONNX Runtime): the
rollout service plans waves from the registered fleet, writes desired state, the agents
install and report, waves advance after their soak, a silent gateway times out without
blocking, and the rollout completes with every live gateway serving the release."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.bus import Bus
from slmops.events import GatewayReport, new_event
from slmops.events.payloads import HealthAggregate
from slmops.service.registry_api import RegistryClient
from slmops.settings import PlatformSettings
from slmops.testing.events import await_events, stream_count
from slmops.testing.models import with_word_tokenizer
from slmops.testing.registry import release_of
from slmops_gateway.app import create_app as create_gateway
from slmops_gateway.settings import GatewaySettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LIVE = [f"gw-{i}" for i in range(6)]


async def _start(rollout: httpx.AsyncClient, version: str, policy: dict[str, Any]) -> str:
    body = {"model_name": "tiny", "version": version, "selector": {"site": "lab"}, "policy": policy}
    started = await rollout.post("/v1/rollouts", json=body)
    assert started.status_code == 201, started.text
    return str(started.json()["rollout_id"])


@contextlib.asynccontextmanager
async def _fleet(pipeline: Any, tmp_path: Path) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for gateway_id in LIVE:
            app = create_gateway(GatewaySettings(
                platform=PlatformSettings(), gateway_id=gateway_id, device_class="test-cpu",
                labels={"site": "lab"}, models_dir=tmp_path / gateway_id,
            ))  # fmt: skip
            app.state.agent.registry = RegistryClient("http://registry", client=pipeline.registry)
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            clients[gateway_id] = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=transport, base_url=f"http://{gateway_id}", auth=pipeline.auth
                )
            )
        yield clients


async def test_waves_advance_over_a_real_fleet_and_a_silent_gateway_does_not_block(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes], tmp_path: Path
) -> None:
    # setup: a validated variant and its release; the rollout service; six live agents and
    # one gateway that registered once and then went silent
    desired = await pipeline.variant(with_word_tokenizer(tiny_onnx()), version="1.0.0")
    release = release_of({"test-cpu": desired})
    async with (
        pipeline.rollout_service() as rollout,
        _fleet(pipeline, tmp_path) as gateways,
    ):
        await bus.publish(new_event(release, source="/test"))
        silent = GatewayReport(gateway_id="gw-silent", kind="registered", device_class="test-cpu",
                               labels={"site": "lab"})  # fmt: skip
        await bus.publish(new_event(silent, source="/test"))
        await pipeline.await_fleet(rollout, len(LIVE) + 1)  # the live ones and the silent one

        # execute: two waves (a third, then all), a short soak, silent after 3 s
        policy = {"percents": [34, 100], "soak_s": 0.3, "silent_timeout_s": 3,
                  "success_threshold": 0.99}  # fmt: skip
        started = await rollout.post("/v1/rollouts", json={
            "model_name": "tiny", "version": "1.0.0", "selector": {"site": "lab"},
            "policy": policy})  # fmt: skip
        assert started.status_code == 201, started.text
        rollout_id = started.json()["rollout_id"]
        done = await await_events(bus, "slmops.rollout.completed.v1", count=1, timeout_s=90)

        # assert: completed, every live gateway serving the release, the silent one counted
        assert done[0].data.rollout_id == rollout_id
        assert (done[0].data.gateways_updated, done[0].data.gateways_silent) == (6, 1)
        wave_subject = "slmops.rollout.wave.started.v1"  # every announcement, duplicates too
        announced = await stream_count(bus, "SLMOPS_ROLLOUT", wave_subject)
        waves = await await_events(bus, wave_subject, count=announced)
        assert [w.data.target_count for w in waves] == [3, 4]
        for gateway_id, client in gateways.items():
            slots = (await client.get("/v1/slots")).json()
            assert slots["active"]["variant_id"] == desired.variant_id, gateway_id
        status = (await rollout.get(f"/v1/rollouts/{rollout_id}")).json()
        assert status["status"] == "completed"
        assert status["gateways"] == {"applied": 6, "assigned": 1}


async def _rolled_back(bus: Bus, gateways: int) -> list[Any]:
    """The rollout.rolled_back events, once they have rolled back ``gateways`` in all."""
    for count in range(1, gateways + 1):
        rolled = await await_events(bus, "slmops.rollout.rolled_back.v1", count=count,
                                    timeout_s=30)  # fmt: skip
        if sum(len(e.data.gateway_ids) for e in rolled) >= gateways:
            return rolled
    raise AssertionError(f"fewer than {gateways} gateways rolled back: {rolled}")


async def test_a_latency_regression_on_the_canary_rolls_back_only_its_gateways(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes], tmp_path: Path
) -> None:
    # setup: the fleet runs 1.0.0 (a first rollout), each gateway with a healthy baseline
    old = await pipeline.variant(with_word_tokenizer(tiny_onnx()), version="1.0.0")
    new = await pipeline.variant(with_word_tokenizer(tiny_onnx(seed=5)), version="1.1.0")
    async with (
        pipeline.rollout_service() as rollout,
        _fleet(pipeline, tmp_path) as gateways,
    ):
        for desired in (old, new):
            await bus.publish(new_event(release_of({"test-cpu": desired}), source="/test"))
        await pipeline.await_fleet(rollout, len(LIVE))
        await _start(rollout, "1.0.0", {"percents": [100], "soak_s": 0.2})
        await await_events(bus, "slmops.rollout.completed.v1", count=1, timeout_s=60)
        for gateway_id in LIVE:
            await bus.publish(new_event(_health(gateway_id, old.variant_id, p95_ms=4.0),
                                        source="/test"))  # fmt: skip
        await pipeline.await_fleet(rollout, len(LIVE), with_health=True)  # the baselines are in

        # execute: roll out 1.1.0; its canary wave gets 10x slower on the new model, one
        # gateway's report first (its breach rolls it back and pauses), then the others'
        rollout_id = await _start(rollout, "1.1.0", {"percents": [34, 100], "soak_s": 5})
        applied = await await_events(
            bus, "slmops.gateway.report.v1.>", count=3, timeout_s=60,
            where=lambda e: e.data.kind == "applied" and e.data.rollout_id == rollout_id,
        )  # fmt: skip
        canary = sorted(e.data.gateway_id for e in applied)
        for n, gateway_id in enumerate(canary):
            await bus.publish(new_event(_health(gateway_id, new.variant_id, p95_ms=40.0),
                                        source="/test"))  # fmt: skip
            if n == 0:
                await await_events(bus, "slmops.rollout.rolled_back.v1", count=1, timeout_s=30)
        rolled = await _rolled_back(bus, len(canary))

        # assert: exactly the canary went back to 1.0.0 (signed rollback), the rest never left
        # it; the paused rollout still rolled back the gateways that breached after the pause
        assert rolled[0].data.gateway_ids == canary[:1]
        assert sorted(g for e in rolled for g in e.data.gateway_ids) == canary
        assert all("(while paused)" in e.data.reason for e in rolled[1:])
        assert rolled[0].data.to_variant_id == old.variant_id
        assert "health gate" in rolled[0].data.reason
        assert "10.00x the previous model's > 1.5x" in rolled[0].data.reason
        for _ in range(100):
            serving = {g: (await c.get("/v1/slots")).json()["active"]["variant_id"]
                       for g, c in gateways.items()}  # fmt: skip
            if set(serving.values()) == {old.variant_id}:
                break
            await asyncio.sleep(0.1)
        assert set(serving.values()) == {old.variant_id}
        status = (await rollout.get(f"/v1/rollouts/{rollout_id}")).json()
        assert (status["status"], status["wave_index"]) == ("paused", 0)
        assert status["gateways"] == {"rolled_back": 3, "pending": 3}


def _health(gateway_id: str, variant_id: str, *, p95_ms: float) -> GatewayReport:
    """A health aggregate as the gateway reports it (the injected fault: slow inference)."""
    return GatewayReport(
        gateway_id=gateway_id, kind="health", device_class="test-cpu", labels={"site": "lab"},
        variant_id=variant_id,
        health=HealthAggregate(window_s=30, request_count=50, error_rate=0.0,
                               latency_p50_ms=p95_ms / 2, latency_p95_ms=p95_ms),
    )  # fmt: skip


async def test_a_paused_rollout_holds_its_wave_until_resumed(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes], tmp_path: Path
) -> None:
    desired = await pipeline.variant(with_word_tokenizer(tiny_onnx()), version="1.0.0")
    async with (
        pipeline.rollout_service() as rollout,
        _fleet(pipeline, tmp_path),
    ):
        await bus.publish(new_event(release_of({"test-cpu": desired}), source="/test"))
        await pipeline.await_fleet(rollout, len(LIVE))
        rollout_id = await _start(rollout, "1.0.0", {"percents": [34, 100], "soak_s": 1})

        # execute: pause during the first wave's soak
        paused = await rollout.post(f"/v1/rollouts/{rollout_id}/pause",
                                    json={"reason": "operator looks at the canary"})  # fmt: skip
        await asyncio.sleep(2.5)  # well past the soak: a running rollout would have advanced

        # assert: held in wave 0; a second pause is refused; resumed, it completes
        assert paused.status_code == 200, paused.text
        assert paused.json()["status"] == "paused"
        status = (await rollout.get(f"/v1/rollouts/{rollout_id}")).json()
        assert (status["status"], status["wave_index"]) == ("paused", 0)
        assert status["reason"] == "pause by test:everything: operator looks at the canary"
        again = await rollout.post(f"/v1/rollouts/{rollout_id}/pause", json={})
        assert again.status_code == 409
        assert "cannot pause a rollout that is paused" in again.json()["detail"]
        resumed = await rollout.post(f"/v1/rollouts/{rollout_id}/resume", json={})
        assert resumed.json()["status"] == "running"
        done = await await_events(bus, "slmops.rollout.completed.v1", count=1, timeout_s=60)
        assert done[0].data.gateways_updated == len(LIVE)
        kinds = [e.type for e in await await_events(bus, "slmops.rollout.>", count=6)]
        assert kinds.index("slmops.rollout.paused.v1") < kinds.index("slmops.rollout.resumed.v1")
        late = await rollout.post(f"/v1/rollouts/{rollout_id}/approve", json={})
        assert late.status_code == 409
        assert "cannot approve a rollout that is completed" in late.json()["detail"]
        unknown = await rollout.post(f"/v1/rollouts/{rollout_id}/frobnicate", json={})
        assert unknown.status_code == 404
        assert "one of pause, resume, cancel, approve, rollback" in unknown.json()["detail"]
