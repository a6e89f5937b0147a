"""A wave to 10,000 simulated gateways on a 3-node R3 NATS cluster survives a node killed
mid-wave: every gateway applies, the rollout completes with all of them updated (none failed,
none silent), and no gateway installs twice.

The registry and the rollout service run as their own processes, told every node's URL, with
their own bus identities; the simulated fleet runs here on the simulator's identity, the test
watches as the admin. Before the wave, the fleet's own node is made the leader of the fleet
stream (where every report is stored), of the rollout service's consumer of it, and of the
rollout's stream and buckets (stepdowns naming it). Once a third of the applied reports reached
NATS that node is SIGKILLed: its clients reconnect to the others, each of those elects a new
leader, publishes in flight are asked again (their ids dedupe them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg

from slmops.auth import BearerToken, LocalCredentials
from slmops.auth.bususers import ensure_local_bus_users
from slmops.bus import Bus, Topology
from slmops.bus.credentials import NatsCredentials
from slmops.bus.handlers import durable_name
from slmops.bus.permissions import COHORT_BUCKET
from slmops.bus.topology import FLEET, ROLLOUT
from slmops.events import new_event
from slmops.events.payloads import DesiredModel
from slmops.settings import PlatformSettings
from slmops.testing.events import await_events
from slmops.testing.models import tiny_encoder_onnx, with_word_tokenizer
from slmops.testing.natscluster import NatsCluster, nats_cluster
from slmops.testing.plugin import service_env_for
from slmops.testing.polling import until, until_answered
from slmops.testing.ports import free_port
from slmops.testing.registry import register_variant, release_of
from slmops_gateway.settings import GatewaySettings
from slmops_gateway.simulator import CachingRegistry, FleetSpec, SimulatedFleet
from slmops_gateway.slots import LoadedModel, SessionOptions
from slmops_gateway.verify import Vouched

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.slow]

GATEWAYS = 10_000
CLASS = "x86-avx512-vnni"
APPLIED = "slmops.gateway.report.v1.applied.>"
# Long enough that a gateway counts as silent only if its report is really lost.
SILENT_TIMEOUT_S = 90
# What the victim leads when it dies: (stream, consumer or None), the fleet stream first.
LED: tuple[tuple[str, str | None], ...] = (
    (FLEET.name, None),
    (FLEET.name, durable_name("rollout", FLEET.name)),  # the rollout service's report folds
    (ROLLOUT.name, None),
    ("KV_slmops-rollouts", None),
    (f"KV_{COHORT_BUCKET}", None),
    ("KV_slmops-gateways", None),
)
POLICY = {"percents": [100], "soak_s": 0, "success_threshold": 1.0,
          "max_rate_per_min": 100_000_000, "silent_timeout_s": SILENT_TIMEOUT_S}  # fmt: skip


@pytest.fixture
def cluster(tmp_path: Path, credentials: LocalCredentials) -> Iterator[NatsCluster]:
    users = ensure_local_bus_users(tmp_path / "var")
    with nats_cluster(tmp_path / "cluster", auth_config=users.config_file) as started:
        yield started


def _bus_user(tmp_path: Path, name: str) -> NatsCredentials:
    return NatsCredentials.from_seed_file(ensure_local_bus_users(tmp_path / "var").seed_file(name))


@pytest.fixture
async def admin_bus(cluster: NatsCluster, tmp_path: Path) -> AsyncIterator[Bus]:
    """The test's eyes (and the declarer of the R3 topology, as `slmops up` is)."""
    bus = await Bus.connect(cluster.url, source="/test/admin",
                            credentials=_bus_user(tmp_path, "admin"))  # fmt: skip
    await bus.declare(Topology().sized(3, {}))
    yield bus
    await bus.close()


@pytest.fixture
def service_env(
    cluster: NatsCluster, s3_server: str, tmp_path: Path, credentials: LocalCredentials
) -> dict[str, str]:
    # every node; streams and buckets as R3
    return {**service_env_for(cluster.url, s3_server, tmp_path, credentials),
            "SLMOPS_JETSTREAM_REPLICAS": "3"}  # fmt: skip


@contextlib.contextmanager
def service_process(
    name: str, env: dict[str, str], logs: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``slmops_<name>`` as its own process on a free port, logging to ``logs/<name>.log``;
    yields its base URL and process, kills it on the way out."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", f"slmops_{name}"],
            env={**os.environ, **env, f"SLMOPS_{name.upper()}_PORT": str(port),
                 "SLMOPS_LOG_LEVEL": "info"},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.kill()
        process.wait(timeout=10)


async def _ready(api: httpx.AsyncClient, process: subprocess.Popen[bytes]) -> None:
    async def answers() -> bool:
        assert process.poll() is None, f"{api.base_url} exited (see its log)"
        with contextlib.suppress(httpx.HTTPError):
            return (await api.get("/readyz")).status_code == 200
        return False

    await until_answered(answers, f"{api.base_url} ready", timeout_s=60)


def count_installs(fleet: SimulatedFleet) -> Counter[str]:
    """Installs per simulated gateway, counted as each device's install finishes."""
    installs: Counter[str] = Counter()
    for gateway_id, sim in fleet.gateways.items():
        device = sim.install

        async def counted(
            desired: DesiredModel, vouched: Vouched, options: SessionOptions,
            gateway_id: str = gateway_id, device: Any = device,
        ) -> LoadedModel:  # fmt: skip
            model: LoadedModel = await device(desired, vouched, options)
            installs[gateway_id] += 1
            return model

        sim.agent.installer = counted
    return installs


async def _connections(cluster: NatsCluster, index: int) -> list[str]:
    """The names of the clients connected to node ``index`` (who has to reconnect)."""
    url = f"{cluster.nodes[index].monitor_url}/connz"
    # generous: mid-wave the 2 cores are saturated and the monitor port answers late
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        conns = (await client.get(url)).json().get("connections") or []
    return sorted(str(c.get("name", "?")) for c in conns)


def _node_of(cluster: NatsCluster, bus: Bus) -> int:
    """The index of the node ``bus`` is connected to."""
    url = bus.nc.connected_url
    assert url is not None
    return next(i for i, n in enumerate(cluster.nodes) if n.url.endswith(f":{url.port}"))


async def _lead(bus: Bus, node: str, stream: str, consumer: str | None = None) -> None:
    """Until ``node`` leads ``stream`` (or its ``consumer``): the leader is asked to step down
    in its favour."""
    what = f"STREAM.LEADER.STEPDOWN.{stream}"
    if consumer is not None:
        what = f"CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}"

    async def leads() -> bool:
        if await _leader(bus, stream, consumer) == node:
            return True
        preferred = json.dumps({"placement": {"preferred": node}}).encode()
        with contextlib.suppress(nats.errors.Error):
            await bus.nc.request(f"$JS.API.{what}", preferred, timeout=2)
        return False

    await until_answered(leads, f"{node} leading {stream} {consumer or ''}", every_s=0.5)


async def _leader(bus: Bus, stream: str, consumer: str | None = None) -> str | None:
    """Its leader's name; None while it elects one (JetStream answers 503 meanwhile: a
    stepdown asked for a moment ago may still be electing on a busy host)."""
    try:
        if consumer is None:
            cluster = (await bus.js.stream_info(stream)).cluster
        else:
            cluster = (await bus.js.consumer_info(stream, consumer)).cluster
    except nats.js.errors.ServiceUnavailableError:
        return None
    return cluster.leader if cluster is not None else None


async def test_a_wave_to_10000_gateways_survives_the_fleet_stream_leader_killed(
    cluster: NatsCluster, admin_bus: Bus, service_env: dict[str, str],
    credentials: LocalCredentials, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for key, value in service_env.items():  # the simulated agents read the platform settings
        monkeypatch.setenv(key, value)
    auth = BearerToken(credentials.token("everything"))
    logs = tmp_path / "logs"
    rollout_env = {**service_env, "SLMOPS_ROLLOUT_TICK_S": "0.2"}
    with (
        service_process("registry", service_env, logs) as (registry_url, registry_process),
        service_process("rollout", rollout_env, logs) as (url, rollout_process),
    ):
        async with (
            httpx.AsyncClient(base_url=registry_url, timeout=60, auth=auth) as registry,
            httpx.AsyncClient(base_url=url, timeout=120, auth=auth) as api,
        ):
            await _ready(registry, registry_process)
            await _ready(api, rollout_process)
            # setup: a release of one variant; 10,000 simulated gateways registered
            model = with_word_tokenizer(tiny_encoder_onnx())
            variant = await register_variant(registry, model, device_class=CLASS)
            await admin_bus.publish(new_event(release_of({CLASS: variant}), source="/test"))
            sim_bus = await Bus.connect(cluster.url, source="/slmops/fleetsim",
                                        credentials=_bus_user(tmp_path, "simulator"))  # fmt: skip
            cache = CachingRegistry(registry_url, auth=BearerToken(credentials.token("simulator")))
            spec = FleetSpec(count=GATEWAYS, classes={CLASS: 1.0}, prefix="nl")
            base = GatewaySettings(platform=PlatformSettings())
            fleet = SimulatedFleet(sim_bus, cache, spec, base)
            installs = count_installs(fleet)
            try:
                await fleet.start()

                async def registered() -> bool:
                    info = await admin_bus.js.stream_info("KV_slmops-gateways")
                    return int(info.state.messages) >= GATEWAYS

                await until_answered(registered, "every gateway registered", timeout_s=120)
                # the fleet's node leads the fleet stream, the rollout's consumer of it and
                # the rollout's stream and buckets: its death cuts the connection of 10,000
                # agents with publishes in flight and elects each of them a new leader
                victim = _node_of(cluster, sim_bus)
                leader = cluster.nodes[victim].name
                for stream, consumer in LED:
                    await _lead(admin_bus, leader, stream, consumer)
                applied: set[str] = set()

                async def on_applied(msg: Msg) -> None:
                    applied.add(msg.subject)  # .applied.<gateway id>: once per gateway

                watch = await admin_bus.nc.subscribe(APPLIED, cb=on_applied)
                await admin_bus.nc.flush()

                # execute: one wave of every gateway; a third of the way through, kill the
                # node leading the fleet stream
                started = await api.post("/v1/rollouts", json={
                    "model_name": "tiny", "version": "1.0.0", "policy": POLICY})  # fmt: skip
                assert started.status_code == 201, started.text
                rollout_id = started.json()["rollout_id"]
                await until(lambda: len(applied) >= GATEWAYS // 3, "a third applied",
                            timeout_s=120)  # fmt: skip
                on_victim = await _connections(cluster, victim)
                leading = [await _leader(admin_bus, *led) for led in LED]
                await asyncio.to_thread(cluster.kill, victim)
                applied_at_kill = len(applied)

                # assert: the rollout completes with every gateway applied, none failed or
                # silent; each gateway installed exactly once
                status: dict[str, Any] = {}

                async def finished() -> bool:  # over HTTP: the test's own bus may be moving
                    nonlocal status
                    with contextlib.suppress(httpx.HTTPError):
                        status = (await api.get(f"/v1/rollouts/{rollout_id}")).json()
                    return status.get("status") not in (None, "waiting", "running")

                await until_answered(finished, "the rollout finished",
                                     timeout_s=SILENT_TIMEOUT_S + 60)  # fmt: skip
                context = (f"{leader} killed at {applied_at_kill} applied; it served "
                           f"{on_victim} and led {leading} of {LED}; logs in {logs}")  # fmt: skip
                assert status["status"] == "completed", (status, context)
                done = await await_events(
                    admin_bus, "slmops.rollout.completed.v1", count=1,
                    where=lambda e: e.data.rollout_id == rollout_id,
                )  # fmt: skip
                outcome = (done[0].data.gateways_updated, done[0].data.gateways_failed,
                           done[0].data.gateways_silent)  # fmt: skip
                assert leading[0] == leader, context  # the kill cost the fleet stream its leader
                assert "/slmops/fleetsim" in on_victim, context  # and cut the fleet off
                assert applied_at_kill < GATEWAYS, context  # mid-wave
                assert outcome == (GATEWAYS, 0, 0), context
                assert status["gateways"] == {"applied": GATEWAYS}, context
                assert fleet.serving() == {variant.variant_id: GATEWAYS}, context
                twice = {g: n for g, n in installs.items() if n > 1}
                assert (len(installs), twice) == (GATEWAYS, {}), context
                await watch.unsubscribe()
            finally:
                await fleet.stop()
                await cache.close()
                await sim_bus.close()
