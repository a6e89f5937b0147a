"""The platform on a real 3-node NATS JetStream cluster: R3 streams and buckets, and a node
killed mid-stream losing nothing (three ``nats-server`` processes, routes on loopback, the
platform's users required as on the local stack)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest

from slmops.auth.bususers import ensure_local_bus_users
from slmops.bus import PIPELINE, Bus, Handlers, Topology
from slmops.bus.credentials import NatsCredentials
from slmops.bus.topology import KV_BUCKETS, STREAMS
from slmops.events import CloudEvent, ModelPublished
from slmops.testing.consumers import StartConsumer, fast_consumer_settings
from slmops.testing.factories import model_published
from slmops.testing.natscluster import NatsCluster, nats_cluster
from slmops.testing.polling import until, until_answered

pytestmark = [pytest.mark.integration, pytest.mark.fault]

R3 = Topology().sized(3, {})
JOBS_BUCKET = "slmops-jobs"


@pytest.fixture
def var_dir(tmp_path: Path) -> Path:
    ensure_local_bus_users(tmp_path / "var")
    return tmp_path / "var"


@pytest.fixture
def cluster(tmp_path: Path, var_dir: Path) -> Iterator[NatsCluster]:
    users = ensure_local_bus_users(var_dir)
    with nats_cluster(tmp_path / "cluster", auth_config=users.config_file) as started:
        yield started


def _credentials(var_dir: Path, name: str) -> NatsCredentials:
    return NatsCredentials.from_seed_file(ensure_local_bus_users(var_dir).seed_file(name))


@pytest.fixture
async def admin_bus(cluster: NatsCluster, var_dir: Path) -> AsyncIterator[Bus]:
    # a short ack timeout: a publish to a stream whose leader died is asked again sooner
    bus = await Bus.connect(cluster.url, source="/test/admin", request_timeout_s=1.5,
                            credentials=_credentials(var_dir, "admin"))  # fmt: skip
    yield bus
    await bus.close()


async def _replicas(bus: Bus, stream: str) -> tuple[int, list[bool]]:
    info = await bus.js.stream_info(stream)
    peers = info.cluster.replicas if info.cluster and info.cluster.replicas else []
    return info.config.num_replicas or 1, [bool(peer.current) for peer in peers]


async def test_streams_and_buckets_declared_r1_become_r3_and_services_find_them(
    admin_bus: Bus, cluster: NatsCluster, var_dir: Path
) -> None:
    await admin_bus.declare(Topology())  # R1, as a single-node platform declared them
    assert (await _replicas(admin_bus, PIPELINE.name))[0] == 1

    await admin_bus.declare(R3)  # SLMOPS_JETSTREAM_REPLICAS=3: updated in place

    names = [s.name for s in STREAMS] + [b.stream for b in KV_BUCKETS]
    for name in names:

        async def two_current_followers(name: str = name) -> bool:
            replicas, current = await _replicas(admin_bus, name)
            return replicas == 3 and current == [True, True]

        await until_answered(two_current_followers, f"{name} on 3 nodes, followers current")
    # a service may not create or change streams: it finds them as declared and goes on
    service = await Bus.connect(cluster.url, source="/test/registry",
                                credentials=_credentials(var_dir, "service-registry"))  # fmt: skip
    try:
        await service.declare_stream(R3.streams[0])
        assert service.declared == {f"stream:{PIPELINE.name}"}
    finally:
        await service.close()


async def _put_when_available(bus: Bus, key: str, value: bytes) -> None:
    """One KV put; while a bucket's new leader is being elected it times out: ask again."""

    async def put() -> bool:
        try:
            kv = await bus.key_value(JOBS_BUCKET)
            await kv.put(key, value)
        except (nats.errors.TimeoutError, nats.js.errors.Error, nats.errors.NoRespondersError):
            return False
        return True

    await until_answered(put, f"a put of {key} while a node is down", timeout_s=30)


@pytest.mark.slow
async def test_a_killed_node_loses_no_event_handles_none_twice_and_catches_up(
    admin_bus: Bus, cluster: NatsCluster, start_consumer: StartConsumer
) -> None:
    await admin_bus.declare(R3)
    handled: list[str] = []

    async def on_published(event: CloudEvent[ModelPublished]) -> None:
        handled.append(event.id)

    handlers = Handlers()
    handlers.register(ModelPublished, on_published)
    await start_consumer(admin_bus, handlers, fast_consumer_settings(ack_wait_s=3.0))
    await _put_when_available(admin_bus, "before", b"1")
    sent: list[str] = []
    # the stream's leader: its election is the worst moment for publishers and the consumer
    info = await admin_bus.js.stream_info(PIPELINE.name)
    assert info.cluster is not None
    assert info.cluster.leader
    victim = next(i for i, node in enumerate(cluster.nodes) if node.name == info.cluster.leader)

    for i in range(300):
        if i == 100:
            cluster.kill(victim)
        event = model_published(version=f"1.0.{i}")
        await admin_bus.publish(event)  # retries through the election; Nats-Msg-Id dedupes
        sent.append(event.id)
    await _put_when_available(admin_bus, "during", b"2")
    kv = await admin_bus.key_value(JOBS_BUCKET)
    assert (await kv.get("before")).value == b"1"
    assert (await kv.get("during")).value == b"2"
    await until(lambda: set(handled) == set(sent), "every event handled", timeout_s=60)

    duplicates = [event_id for event_id, n in Counter(handled).items() if n > 1]
    assert duplicates == []
    info = await admin_bus.js.stream_info(PIPELINE.name)
    assert info.state.messages == 300  # each retried publish stored once

    await asyncio.to_thread(cluster.restart, victim)  # same ports, same store

    async def caught_up() -> bool:
        streams = await asyncio.to_thread(cluster.stream_messages, victim)
        return streams.get(PIPELINE.name) == 300

    await until_answered(caught_up, f"{cluster.nodes[victim].name} holding all 300 events")
