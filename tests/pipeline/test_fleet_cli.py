"""`slmops fleet simulate` as a user runs it (a process, real NATS): the fleet registers, and a
SIGTERM stops it cleanly - exit 0 and its JetStream consumer removed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import nats.js.errors
import pytest

from slmops.bus import Bus
from slmops.testing.events import await_events

pytestmark = [pytest.mark.integration]


def simulate(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "slmops.cli.main", "fleet", "simulate", *args],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


async def test_fleet_simulate_registers_its_gateways_and_stops_cleanly_on_sigterm(
    bus: Bus, platform_env: dict[str, str]
) -> None:
    # setup / execute: 30 gateways over two classes
    process = simulate(platform_env, "--count", "30", "--classes", "test-cpu=0.5,test-arm=0.5",
                       "--label", "site=berlin,paris", "--prefix", "clifleet")  # fmt: skip
    try:
        registered = await await_events(
            bus, "slmops.gateway.report.v1.registered.>", count=30, timeout_s=60
        )
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read().decode() if process.stdout else ""

    # assert
    assert code == 0, process.stderr.read().decode() if process.stderr else ""
    assert "30 simulated gateways registered" in output
    classes = sorted(e.data.device_class for e in registered)
    assert classes == ["test-arm"] * 15 + ["test-cpu"] * 15
    assert {e.data.labels["site"] for e in registered} == {"berlin", "paris"}
    with pytest.raises(nats.js.errors.NotFoundError):
        await bus.js.consumer_info("SLMOPS_ROLLOUT", "fleetsim-clifleet")
