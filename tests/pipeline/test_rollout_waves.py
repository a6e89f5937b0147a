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
from slmops.events import GatewayReport, ReleaseCreated, new_event, release_id_for
from slmops.events.payloads import ReleaseEntry
from slmops.service.registry_api import RegistryClient
from slmops.settings import PlatformSettings
from slmops.testing.events import await_events
from slmops.testing.models import with_word_tokenizer
from slmops_gateway.app import create_app as create_gateway
from slmops_gateway.settings import GatewaySettings
from slmops_rollout.app import create_app as create_rollout
from slmops_rollout.settings import RolloutSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LIVE = [f"gw-{i}" for i in range(6)]


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
                httpx.AsyncClient(transport=transport, base_url=f"http://{gateway_id}")
            )
        yield clients


async def test_waves_advance_over_a_real_fleet_and_a_silent_gateway_does_not_block(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes], tmp_path: Path
) -> None:
    # setup: a validated variant and its release; the rollout service; six live agents and
    # one gateway that registered once and then went silent
    desired = await pipeline.variant(with_word_tokenizer(tiny_onnx()), version="1.0.0")
    release = ReleaseCreated(
        release_id=release_id_for("tiny", "1.0.0"), model_name="tiny", version="1.0.0",
        entries=[ReleaseEntry(device_class="test-cpu", variant_id=desired.variant_id,
                              artifact=desired.artifact, manifest_digest=desired.manifest_digest)],
    )  # fmt: skip
    rollout_app = create_rollout(RolloutSettings(platform=PlatformSettings(), tick_s=0.2))
    async with (
        rollout_app.router.lifespan_context(rollout_app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=rollout_app), base_url="http://rollout"
        ) as rollout,  # fmt: skip
        _fleet(pipeline, tmp_path) as gateways,
    ):
        await bus.publish(new_event(release, source="/test"))
        silent = GatewayReport(gateway_id="gw-silent", kind="registered", device_class="test-cpu",
                               labels={"site": "lab"})  # fmt: skip
        await bus.publish(new_event(silent, source="/test"))
        for _ in range(100):  # the fleet record fills from the registrations
            fleet = (await rollout.get("/v1/gateways")).json()
            if isinstance(fleet, list) and len(fleet) == 7:
                break
            await asyncio.sleep(0.1)
        assert len(fleet) == 7

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
        waves = await await_events(bus, "slmops.rollout.wave.started.v1", count=2)
        assert [w.data.target_count for w in waves] == [3, 4]
        for gateway_id, client in gateways.items():
            slots = (await client.get("/v1/slots")).json()
            assert slots["active"]["variant_id"] == desired.variant_id, gateway_id
        status = (await rollout.get(f"/v1/rollouts/{rollout_id}")).json()
        assert status["status"] == "completed"
        assert status["gateways"] == {"applied": 6, "assigned": 1}
