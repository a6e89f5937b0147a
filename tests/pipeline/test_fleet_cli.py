"""`slmops fleet simulate` as a user runs it (a process, real NATS): the fleet registers, and a
SIGTERM stops it cleanly - exit 0 and no JetStream consumer left behind (a site of cohort
gateways keeps none; one with older gateways removes its durable: test_cohort_rollouts.py)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import nats.js.errors
import psutil
import pytest

from slmops.bus import Bus
from slmops.testing.events import await_events
from slmops.testing.ports import free_port

pytestmark = [pytest.mark.integration]


def simulate(env: dict[str, str], *args: str, terminal: bool = False) -> subprocess.Popen[bytes]:
    """`slmops fleet simulate ARGS`; ``terminal``: in a process group of its own, as a
    terminal's foreground job is (a Ctrl-C reaches the whole group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "slmops.cli.main", "fleet", "simulate", *args],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=terminal,
    )  # fmt: skip


async def terminated(process: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    """SIGTERM (a `kill` or Ctrl-C), then its exit code, stdout and stderr."""
    process.send_signal(signal.SIGTERM)
    out, err = await asyncio.to_thread(process.communicate, timeout=60)
    return process.returncode, out.decode(), err.decode()


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
        code, output, err = await terminated(process)
    finally:
        if process.poll() is None:
            process.kill()

    # assert
    assert code == 0, err
    assert "30 simulated gateways registered" in output
    classes = sorted(e.data.device_class for e in registered)
    assert classes == ["test-arm"] * 15 + ["test-cpu"] * 15
    assert output.rstrip().endswith("serving - -: 30")  # what it served as it stopped
    assert {e.data.labels["site"] for e in registered} == {"berlin", "paris"}
    with pytest.raises(nats.js.errors.NotFoundError):
        await bus.js.consumer_info("SLMOPS_ROLLOUT", "fleetsim-clifleet")


async def test_a_fleet_in_two_processes_registers_every_gateway_once_and_stops_cleanly(
    bus: Bus, platform_env: dict[str, str]
) -> None:
    # setup / execute: 31 gateways shared by two processes, each a site of its own, for 6 s
    process = simulate(platform_env, "--count", "31", "--processes", "2", "--prefix", "parted",
                       "--duration-s", "6")  # fmt: skip
    try:
        registered = await await_events(
            bus, "slmops.gateway.report.v1.registered.>", count=31, timeout_s=90
        )
        for part in (0, 1):  # sites of cohort gateways: their assignments heard as core NATS
            with pytest.raises(nats.js.errors.NotFoundError):
                await bus.js.consumer_info("SLMOPS_ROLLOUT", f"fleetsim-parted-{part}")
        out, errors = await asyncio.to_thread(process.communicate, timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    code, output, err = process.returncode, out.decode(), errors.decode()

    # assert: each gateway once, the fleet counted whole
    assert code == 0, err
    assert "31 simulated gateways registered" in output
    assert sorted(e.data.gateway_id for e in registered) == [f"parted-{i:06d}" for i in range(31)]
    assert "serving - -: 31" in output  # asked of both parts (every 5 s, and as it stops)


def test_more_processes_than_gateways_is_refused_with_a_reason(
    platform_env: dict[str, str],
) -> None:
    process = simulate(platform_env, "--count", "2", "--processes", "3")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "3 processes for 2 gateways" in err.decode()


async def test_a_part_of_the_fleet_gone_stops_the_rest_with_the_reason(
    bus: Bus, platform_env: dict[str, str]
) -> None:
    # setup: a fleet in two processes, registered
    process = simulate(platform_env, "--count", "8", "--processes", "2", "--prefix", "halved",
                       "--duration-s", "600")  # fmt: skip
    try:
        await await_events(bus, "slmops.gateway.report.v1.registered.>", count=8, timeout_s=90)
        parts = psutil.Process(process.pid).children()
        assert len(parts) == 2

        # execute: one part killed
        parts[1].kill()
        code = await asyncio.to_thread(process.wait, 60)
    finally:
        if process.poll() is None:
            process.kill()

    # assert: the fleet stops with the reason, the other part stops too
    assert code == 1
    err = process.stderr.read().decode() if process.stderr else ""
    # (killed while the fleet still starts - reconciling after registering - or after it)
    assert re.search(r"the simulated fleet (did not start|failed): fleet part \d exited "
                     r"\(code -9\)", err), err  # fmt: skip
    assert not parts[0].is_running() or parts[0].status() == psutil.STATUS_ZOMBIE


def test_no_nats_there_is_said_not_waited_for(platform_env: dict[str, str]) -> None:
    closed = f"nats://127.0.0.1:{free_port()}"
    process = simulate({**platform_env, "SLMOPS_NATS_URL": closed}, "--count", "2")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert f"NATS not reachable at {closed}" in err.decode()


async def test_ctrl_c_stops_a_fleet_in_processes_cleanly(
    bus: Bus, platform_env: dict[str, str]
) -> None:
    # setup: a fleet in two processes in a terminal's process group, registered
    process = simulate(platform_env, "--count", "6", "--processes", "2", "--prefix", "ctrlc",
                       terminal=True)  # fmt: skip
    try:
        await await_events(bus, "slmops.gateway.report.v1.registered.>", count=6, timeout_s=90)
        parts = psutil.Process(process.pid).children()

        # execute: Ctrl-C, as a terminal sends it (SIGINT to the whole group)
        os.killpg(process.pid, signal.SIGINT)
        out, err = await asyncio.to_thread(process.communicate, timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    # assert: the parent stopped its parts; nobody died half-way
    assert process.returncode == 0, err.decode()
    assert out.decode().rstrip().endswith("serving - -: 6")
    assert "Traceback" not in err.decode()
    assert len(parts) == 2
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in parts)
