"""A rollout service SIGKILLed in the middle of a wave (a real process, real NATS): a new
process loads the rollout from KV, sends the rest of the wave and completes it - nothing sent
twice to the fleet's state, nothing lost, one announcement per wave."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from slmops.bus import Bus
from slmops.testing.events import await_events, stream_count
from slmops.testing.models import with_word_tokenizer
from slmops.testing.ports import free_port
from slmops_gateway.simulator import FleetSpec

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.slow]
CLASSES = ("test-cpu", "test-arm")
WAVE_STARTED = "slmops.rollout.wave.started.v1"


def start_rollout_service(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "slmops_rollout"],
        # A report the killed process had fetched but not acked comes back after ack_wait: short
        # here, so the test sees it land within seconds.
        env={**os.environ, **env, "SLMOPS_ROLLOUT_PORT": str(port), "SLMOPS_ROLLOUT_TICK_S": "0.2",
             "SLMOPS_LOG_LEVEL": "warning", "SLMOPS_CONSUMER_ACK_WAIT_S": "5"},
    )  # fmt: skip


async def await_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient(base_url=url) as client:
        for _ in range(300):
            assert process.poll() is None, "the rollout service exited"
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError("the rollout service never became ready")


async def _until_serving(fleet: Any, more_than: int, timeout_s: float = 60) -> None:
    """Until more than ``more_than`` simulated gateways serve a model."""
    serving = 0
    for _ in range(int(timeout_s / 0.05)):
        serving = sum(n for v, n in fleet.serving().items() if v != "-")
        if serving > more_than:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{serving} gateways serve after {timeout_s:g} s, expected > {more_than}")


async def test_a_killed_rollout_service_resumes_mid_wave(
    pipeline: Any, bus: Bus, platform_env: dict[str, str], tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: a rollout service process, 200 simulated gateways of two classes, a release
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = start_rollout_service(platform_env, port)
    second: subprocess.Popen[bytes] | None = None
    spec = FleetSpec(count=200, classes=dict.fromkeys(CLASSES, 0.5), prefix="rs")
    try:
        await await_ready(url, first)
        variants = await pipeline.release(bus, with_word_tokenizer(tiny_onnx()), CLASSES)
        async with (
            pipeline.simulated_fleet(bus, spec) as fleet,
            httpx.AsyncClient(base_url=url, auth=pipeline.auth) as api,
        ):
            await pipeline.await_fleet(api, 200)

            # execute: wave 1 (180 gateways) is sent at 20 per second; kill the service once
            # the first of them serve (mid-wave), then start another one
            policy = {"percents": [10, 100], "soak_s": 0.5, "max_rate_per_min": 1200}
            started = await api.post("/v1/rollouts", json={
                "model_name": "tiny", "version": "1.0.0", "policy": policy})  # fmt: skip
            assert started.status_code == 201, started.text
            await await_events(bus, WAVE_STARTED, count=2, timeout_s=60)
            await _until_serving(fleet, more_than=20)  # wave 0's 20 and some of wave 1
            first.kill()
            first.wait(timeout=10)
            serving_at_kill = sum(n for v, n in fleet.serving().items() if v != "-")
            second = start_rollout_service(platform_env, port)
            done = await await_events(bus, "slmops.rollout.completed.v1", count=1, timeout_s=90)

            # assert: it was mid-wave; the second process finished it; every gateway serves
            # its class's variant; each wave was announced once
            assert 20 < serving_at_kill < 200
            rollout_id = started.json()["rollout_id"]
            assert done[0].data.rollout_id == rollout_id
            # the wave may complete a moment before a report the killed process held comes
            # back (its success threshold is met), but no report is lost: all 200 land
            updated = done[0].data.gateways_updated
            assert updated + done[0].data.gateways_silent == 200
            assert updated >= 190

            async def applied() -> int:
                status = (await api.get(f"/v1/rollouts/{rollout_id}")).json()
                return int(status["gateways"].get("applied", 0))

            for _ in range(150):
                if await applied() == 200:
                    break
                await asyncio.sleep(0.2)
            assert await applied() == 200
            for sim in fleet.gateways.values():
                active = sim.agent.slots.active
                assert active is not None
                assert active.variant_id == variants[sim.agent.settings.device_class].variant_id
            announced = await stream_count(bus, "SLMOPS_ROLLOUT", WAVE_STARTED)
            waves = await await_events(bus, WAVE_STARTED, count=announced)
            assert [(w.data.rollout_id, w.data.wave_index) for w in waves] == [
                (done[0].data.rollout_id, 0),
                (done[0].data.rollout_id, 1),
            ]
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)
