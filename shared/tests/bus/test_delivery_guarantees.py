"""At-least-once delivery with exactly-once effects, across process kills and broker restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmops.bus import PIPELINE, Bus, Handlers
from slmops.events import CloudEvent, ModelPublished, OptimizationFailed
from slmops.testing.consumers import StartConsumer, fast_consumer_settings
from slmops.testing.events import stream_count
from slmops.testing.factories import model_published
from slmops.testing.natsserver import NatsServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.fault]
WORKER = Path(__file__).with_name("killable_worker.py")


def start_worker(nats_url: str, marker_dir: Path, *, hang: bool) -> subprocess.Popen[bytes]:
    env = {**os.environ, "WORKER_HANG": "1" if hang else "0"}
    return subprocess.Popen([sys.executable, str(WORKER), nats_url, str(marker_dir)], env=env)


def wait_for_file(directory: Path, prefix: str, timeout_s: float = 30) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(directory.glob(f"{prefix}*"))
        if found:
            return found[0]
        time.sleep(0.05)
    raise TimeoutError(f"no {prefix}* in {directory} after {timeout_s}s")


@pytest.mark.slow
async def test_killed_consumer_redelivers_to_new_process_and_effect_happens_once(
    bus: Bus, nats_server: NatsServerProcess, tmp_path: Path
) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    sent = model_published()
    first = start_worker(nats_server.url, first_dir, hang=True)
    try:
        await asyncio.to_thread(wait_for_file, first_dir, "ready-")
        await bus.publish(sent)
        await asyncio.to_thread(wait_for_file, first_dir, "started-")
        first.send_signal(signal.SIGKILL)  # handler started, effect done, not acked
        first.wait(timeout=10)

        second = start_worker(nats_server.url, second_dir, hang=False)
        assert await asyncio.to_thread(second.wait, 60) == 0
    finally:
        if first.poll() is None:
            first.kill()

    info = await bus.js.consumer_info(PIPELINE.name, "worker-pipeline")
    assert wait_for_file(second_dir, "started-").read_text().count(sent.id) == 1
    assert await stream_count(bus, PIPELINE.name, OptimizationFailed.event_type) == 1
    assert info.num_ack_pending == 0
    assert info.num_pending == 0
    assert info.delivered.consumer_seq == 2  # one message, delivered to each process once


@pytest.mark.slow
async def test_consumers_resume_after_broker_restart_and_nothing_is_lost(
    bus: Bus, nats_server: NatsServerProcess, start_consumer: StartConsumer
) -> None:
    handled: set[str] = set()

    async def on_published(event: CloudEvent[ModelPublished]) -> None:
        handled.add(event.id)

    handlers = Handlers()
    handlers.register(ModelPublished, on_published)
    await start_consumer(bus, handlers, fast_consumer_settings(ack_wait_s=3.0))
    sent: list[str] = []

    for i in range(60):
        if i == 30:  # same port, same store directory
            await asyncio.to_thread(nats_server.restart)
        event = model_published(version=f"1.0.{i}")
        await bus.publish(event)  # retries while the broker is away
        sent.append(event.id)
        await asyncio.sleep(0.01)
    deadline = time.monotonic() + 30
    while handled != set(sent) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)

    assert handled == set(sent)
    assert await stream_count(bus, PIPELINE.name) == 60


async def test_after_a_broker_restart_the_reconnect_callbacks_run(
    bus: Bus, nats_server: NatsServerProcess
) -> None:
    # what a process heard only as core messages it may have missed: it reads it again
    reconnected = asyncio.Event()

    async def read_again() -> None:
        reconnected.set()

    bus.on_reconnect.append(read_again)
    await asyncio.to_thread(nats_server.restart)

    await asyncio.wait_for(reconnected.wait(), 30)
    assert bus.connected
