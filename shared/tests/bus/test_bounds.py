"""Every stream and bucket is bounded; operators can size them and see how full they are."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmops.bus import Bus, Topology
from slmops.bus.topology import FLEET, GIB, KV_BUCKETS, STREAMS, KvSpec
from slmops.events import GatewayReport, new_event
from slmops.stack.components import ComponentKind
from slmops.stack.status import ComponentStatus, storage_use
from slmops.testing.natsserver import NatsServerProcess

pytestmark = pytest.mark.integration


def test_every_stream_and_bucket_has_a_size_cap() -> None:
    assert all(s.max_bytes > 0 for s in STREAMS)
    assert all(b.max_bytes > 0 for b in KV_BUCKETS)
    assert FLEET.max_age_s > 0
    assert FLEET.max_msgs_per_subject > 0


def test_sizing_sets_replicas_and_named_caps_and_refuses_unknown_streams() -> None:
    sized = Topology().sized(3, {"SLMOPS_FLEET": 32, "KV_slmops-desired-state": 2})
    caps = {s.name: s.max_bytes for s in sized.streams}
    caps |= {b.stream: b.max_bytes for b in sized.kv_buckets}
    assert caps["SLMOPS_FLEET"] == 32 * GIB
    assert caps["KV_slmops-desired-state"] == 2 * GIB
    assert caps["SLMOPS_PIPELINE"] == 1 * GIB  # unnamed streams keep theirs
    assert {s.replicas for s in sized.streams} | {b.replicas for b in sized.kv_buckets} == {3}
    with pytest.raises(ValueError, match="no stream SLMOPS_NOPE"):
        Topology().sized(1, {"SLMOPS_NOPE": 1})


async def test_a_chatty_gateway_keeps_only_its_newest_reports(bus: Bus) -> None:
    for i in range(FLEET.max_msgs_per_subject + 20):
        report = GatewayReport(gateway_id="gw-chatty", kind="health", device_class="c",
                               reason=str(i))  # fmt: skip
        await bus.publish(new_event(report, source="/test"))
    info = await bus.js.stream_info(FLEET.name)
    assert info.state.messages == FLEET.max_msgs_per_subject


async def test_a_bucket_declared_by_an_older_release_gets_its_bounds_in_place(bus: Bus) -> None:
    old = await bus.js.create_key_value(bucket="slmops-old")  # no cap, as before
    await old.put("k", b"kept")

    kv = await bus.declare_kv(KvSpec("slmops-old", "now bounded", max_bytes=64 * 2**20))

    assert (await kv.get("k")).value == b"kept"
    assert (await bus.js.stream_info("KV_slmops-old")).config.max_bytes == 64 * 2**20


async def test_status_reports_each_streams_fill_and_warns_near_its_cap(
    nats_server: NatsServerProcess, bus: Bus, tmp_path: Path
) -> None:
    await bus.declare(Topology().sized(1, {"SLMOPS_DLQ": 1 / 1024}))  # a 1 MiB cap
    nats = ComponentStatus(
        name="nats", kind=ComponentKind.NATS, pid=0, alive=True, ready=True, url=nats_server.url,
        urls={"nats": nats_server.url, "monitor": nats_server.monitor_url}, detail="", body=None,
        log_path=str(tmp_path / "log"),
    )  # fmt: skip
    await bus.js.publish("slmops.deadletter.x", b"x" * 900_000)

    uses = {u.name: u for u in storage_use([nats])}

    assert set(uses) >= {s.name for s in STREAMS} | {f"KV_{b.bucket}" for b in KV_BUCKETS}
    assert uses["SLMOPS_FLEET"].max_bytes == 1 * GIB
    assert uses["SLMOPS_FLEET"].warning() is None
    dlq = uses["SLMOPS_DLQ"]
    assert dlq.share is not None
    assert dlq.share >= 0.8
    assert "SLMOPS_DLQ holds" in (dlq.warning() or "")
