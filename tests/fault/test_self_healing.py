"""The local stack heals itself: one journey (publish -> variant -> report -> release ->
rollout to the stack's own gateway) on the real stack started as a user does
(`slmops up --detach`), during which each of the five services is SIGKILLed once, in turn,
and NATS and the S3 server are restarted once. The supervisor restarts each; the journey
completes with no duplicate variant, report, release or rollout, and `slmops status`
shows who was restarted and why.

A tiny encoder and the pipeline tests' quick ``test-cpu`` class keep the work itself to
seconds: the cost is the stack's start and the optimizer's restart (its in-process Ray)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from slmops.auth import BearerTokenFile, local_credentials
from slmops.auth.bususers import local_bus_users
from slmops.bus import Bus
from slmops.bus.credentials import NatsCredentials
from slmops.events.envelope import CloudEvent
from slmops.stack.state import find_process, read_state, state_path
from slmops.stack.status import stack_status
from slmops.testing.events import await_events
from slmops.testing.localstack import STACK, RunningStack, local_stack
from slmops.testing.models import tiny_encoder_onnx, with_word_tokenizer
from slmops.testing.polling import until

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(900)]

PROFILES = Path(__file__).parents[1] / "pipeline" / "profiles"  # test-cpu: one quick recipe
SERVICES = ("registry", "optimizer", "validator", "rollout", "gateway")
MODEL, VERSION = "healing", "1.0.0"
T = TypeVar("T")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    folder = tmp_path_factory.mktemp("healing")
    # Ray's socket paths must stay under 108 bytes: its session files in a short folder
    ray_dir = Path(tempfile.mkdtemp(prefix="slmops-heal-"))
    with local_stack(
        folder / "var",
        SLMOPS_OPTIMIZER_RAY_TEMP_DIR=str(ray_dir),
        SLMOPS_STACK_SERVICES=",".join(SERVICES),
        SLMOPS_OPTIMIZER_PROFILES_DIR=str(PROFILES),
        SLMOPS_VALIDATOR_PROFILES_DIR=str(PROFILES),
        SLMOPS_GATEWAY_DEVICE_CLASS="test-cpu",
        # what a killed process had taken but not acked comes back within seconds
        SLMOPS_CONSUMER_ACK_WAIT_S="5",
        SLMOPS_ROLLOUT_TICK_S="0.2",
        SLMOPS_LOG_LEVEL="info",
    ) as running:
        yield running
    shutil.rmtree(ray_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def admin_bus(stack: RunningStack) -> AsyncIterator[Bus]:
    seed = local_bus_users(stack.var_dir).seed_file("admin")
    bus = await Bus.connect(stack.urls["nats"], source="/test/healing",
                            credentials=NatsCredentials.from_seed_file(seed))  # fmt: skip
    try:
        yield bus
    finally:
        await bus.close()


async def retrying(what: str, attempt: Callable[[], Awaitable[T | None]], timeout_s: float) -> T:
    """``attempt()`` until it returns a value: a component may be restarting meanwhile (a
    connection error or None means "not yet")."""
    result: list[T] = []

    async def once() -> bool:
        with contextlib.suppress(Exception):  # refused, reset, timed out: it is restarting
            value = await attempt()
            if value is not None:
                result.append(value)
        return bool(result)

    async def poll() -> None:
        while not await once():
            await asyncio.sleep(0.5)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"waited {timeout_s:g} s for {what}") from None
    return result[0]


async def events(bus: Bus, subject: str, count: int, timeout_s: float) -> list[CloudEvent[Any]]:
    async def read() -> list[CloudEvent[Any]] | None:
        return await await_events(bus, subject, count=count, timeout_s=5)

    return await retrying(f"{count} {subject}", read, timeout_s)


async def count_events(bus: Bus, subject: str) -> int:
    """How many events of ``subject`` its stream holds (a duplicate would be one more)."""
    stream = await bus.js.find_stream_name_by_subject(subject)
    info = await bus.js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def restart(stack: RunningStack, name: str, how: signal.Signals) -> None:
    """Signal component ``name`` by its recorded PID, then wait until the supervisor has
    started it again and it is ready."""
    state = read_state(state_path(stack.var_dir))
    assert state is not None
    record = next(r for r in state.components if r.name == name)
    process = find_process(record)
    assert process is not None, f"{name} is not running before it is killed"
    process.send_signal(how)

    def back() -> bool:
        components = stack_status(stack.var_dir, timeout_s=1.0) or []
        item = next(c for c in components if c.name == name)
        return item.pid != record.pid and item.ready

    await until(back, f"{name} restarted and ready", timeout_s=240, every_s=0.5)


async def test_a_journey_completes_while_every_component_is_killed_once(
    stack: RunningStack,
) -> None:
    auth = BearerTokenFile(local_credentials(stack.var_dir).token_file("admin"))
    registry, rollout = stack.urls["registry"], stack.urls["rollout"]
    # A connection per request: services restart all along, and a pooled connection reused as
    # its server closes it idle (uvicorn: after 5 s) fails the request (CI saw a ReadError).
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with (
        admin_bus(stack) as bus,
        httpx.AsyncClient(auth=auth, timeout=30, limits=fresh) as http,
    ):
        # publish, and kill the optimizer while it plans and runs the job
        blob = await http.post(f"{registry}/v1/blobs",
                               content=with_word_tokenizer(tiny_encoder_onnx()))  # fmt: skip
        assert blob.status_code == 201, blob.text
        published = await http.post(f"{registry}/v1/models", json={
            "model_name": MODEL, "version": VERSION, "artifact_digest": blob.json()["digest"],
            "format": "onnx", "task": "feature-extraction", "device_classes": ["test-cpu"],
        })  # fmt: skip
        assert published.status_code in (200, 201), published.text
        (planned,) = await events(bus, "slmops.optimization.planned.v1", 1, 120)
        jobs = len(planned.data.jobs)
        jobs_dir = stack.var_dir / "optimizer" / "replicas" / "jobs"
        await until(lambda: any(jobs_dir.glob("*.pid*")), "a job at work", timeout_s=120,
                    every_s=0.02)  # fmt: skip
        killed_jobs = list(jobs_dir.iterdir())
        await restart(stack, "optimizer", signal.SIGKILL)
        # the rest in turn while the journey goes on: each back before the next goes
        await restart(stack, "registry", signal.SIGKILL)
        await restart(stack, "nats", signal.SIGKILL)
        await restart(stack, "validator", signal.SIGKILL)
        await restart(stack, "s3", signal.SIGTERM)
        (release,) = await events(bus, "slmops.release.created.v1", 1, 300)
        await restart(stack, "rollout", signal.SIGKILL)

        async def start_rollout() -> dict[str, Any] | None:
            answer = await http.post(f"{rollout}/v1/rollouts", json={
                "model_name": MODEL, "version": VERSION, "selector": {},
                "policy": {"percents": [100], "soak_s": 0, "silent_timeout_s": 60},
            })  # fmt: skip
            # 404/409: the restarted service has not taken in the release / the gateway yet
            return answer.json() if answer.status_code == 201 else None

        started = await retrying("the rollout to start", start_rollout, 120)
        await restart(stack, "gateway", signal.SIGKILL)
        (completed,) = await events(bus, "slmops.rollout.completed.v1", 1, 180)

        # the journey completed: the stack's gateway runs the released variant
        assert completed.data.rollout_id == started["rollout_id"]
        chosen = {e.device_class: e.variant_id for e in release.data.entries}
        assert chosen["test-cpu"] is not None
        assert completed.data.gateways_updated == 1  # the stack's own gateway
        state = (await http.get(f"{rollout}/v1/rollouts/{started['rollout_id']}")).json()
        assert state["status"] == "completed", state

        # nothing happened twice
        for subject, expected in (
            ("slmops.optimization.completed.v1", jobs),
            ("slmops.validation.*.v1", jobs),
            ("slmops.release.created.v1", 1),
            ("slmops.rollout.started.v1", 1),
            ("slmops.rollout.completed.v1", 1),
        ):
            assert await count_events(bus, subject) == expected, subject
        lineage = (await http.get(f"{registry}/v1/models/{MODEL}/{VERSION}/lineage")).json()
        assert len(lineage["variants"]) == jobs
        assert len(lineage["releases"]) == 1
        assert len(lineage["rollouts"]) == 1
        listed = (await http.get(f"{rollout}/v1/rollouts", params={"model_name": MODEL})).json()
        assert len(listed) == 1

    # `slmops status` tells who was restarted and why
    shown = await asyncio.to_thread(
        subprocess.run, [*STACK, "status", "--json"], env=stack.env, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    document = json.loads(shown.stdout)
    assert document["ready"] is True, shown.stdout
    assert document["supervisor"]["alive"] is True
    for name in ("nats", "s3", *SERVICES):
        item = document["components"][name]
        assert item["restarts"] >= 1, (name, item)
        reason = "SIGTERM" if name == "s3" else "SIGKILL"
        assert item["last_exit"]["reason"] == reason, (name, item)
    # the job killed mid-way left its folder; the optimizer removed it when it started again
    assert killed_jobs
    assert [folder for folder in killed_jobs if folder.exists()] == []
