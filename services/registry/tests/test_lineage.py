"""Lineage as a projection of the event log: live, and rebuilt by replay."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import httpx
import nats.errors
import nats.js.errors
import pytest

from slmops.bus import LINEAGE_KV, Bus
from slmops.events import (
    ArtifactRef,
    EventPayload,
    GatewayReport,
    OptimizationCompleted,
    OptimizationFailed,
    ReleaseCreated,
    ReleaseFailed,
    RolloutCompleted,
    RolloutStarted,
    RolloutWaveStarted,
    ValidationFailed,
    ValidationPassed,
    new_event,
)
from slmops.events.payloads import GateResult, PassSpec, Recipe, ReleaseEntry, WavePlan
from slmops_registry import rebuild as rebuild_module
from slmops_registry.testing import RegistryUnderTest, gguf_bytes

pytestmark = pytest.mark.integration
NAME, VERSION = "smollm2-135m", "1.0.0"


def ref(seed: str, size: int = 1000) -> ArtifactRef:
    digest = "sha256:" + hashlib.sha256(seed.encode()).hexdigest()
    return ArtifactRef(digest=digest, size_bytes=size, uri=f"s3://b/{seed}")


def pipeline_story(parent: str) -> list[EventPayload]:
    """What the optimizer, validator, rollout service and two gateways would say."""
    recipe = Recipe(name="int8", passes=[PassSpec(name="int8_dynamic")])
    common = {"model_name": NAME, "version": VERSION}
    return [
        OptimizationCompleted(**common, variant_id="v-x86", device_class="x86-vnni",
                              parent_digest=parent, recipe=recipe, artifact=ref("x86", 500),
                              duration_s=3.5),
        OptimizationCompleted(**common, variant_id="v-arm", device_class="arm64",
                              parent_digest=parent, recipe=recipe, artifact=ref("arm", 600),
                              duration_s=4.0),
        OptimizationFailed(**common, device_class="npu", recipe_name="qdq", reason="no calib"),
        ValidationPassed(**common, variant_id="v-x86", device_class="x86-vnni",
                         gates=[GateResult(name="cosine", value=0.99, budget=0.98, passed=True)]),
        ValidationFailed(**common, variant_id="v-arm", device_class="arm64",
                         reason="cosine 0.91 < 0.98"),
        ReleaseCreated(**common, release_id="rel-1", entries=[
            ReleaseEntry(device_class="x86-vnni", variant_id="v-x86", reason="smallest"),
            ReleaseEntry(device_class="arm64", variant_id=None, reason="none passed"),
        ]),
        RolloutStarted(**common, rollout_id="ro-1", release_id="rel-1",
                       waves=[WavePlan(index=0, percent=50, target_count=1),
                              WavePlan(index=1, percent=100, target_count=2)]),
        RolloutWaveStarted(rollout_id="ro-1", wave_index=0, target_count=1),
        GatewayReport(gateway_id="gw-1", kind="applied", device_class="x86-vnni",
                      rollout_id="ro-1", variant_id="v-x86"),
        GatewayReport(gateway_id="gw-2", kind="failed", device_class="x86-vnni",
                      rollout_id="ro-1", variant_id="v-x86", reason="smoke test failed"),
        GatewayReport(gateway_id="gw-2", kind="health", device_class="x86-vnni"),
        RolloutCompleted(rollout_id="ro-1", gateways_updated=1, gateways_failed=1),
    ]  # fmt: skip


async def lineage_when(
    client: httpx.AsyncClient, predicate: Any, timeout_s: float = 20
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        response = await client.get(f"/v1/models/{NAME}/{VERSION}/lineage")
        if response.status_code == 200:
            last = response.json()
            if predicate(last):
                return last
        await asyncio.sleep(0.1)
    raise TimeoutError(f"lineage never got there; last: {last}")


def complete(lineage: dict[str, Any]) -> bool:
    rollouts = lineage["rollouts"]
    return (
        lineage["published"] is not None
        and len(lineage["variants"]) == 2
        and all(v["reports"] for v in lineage["variants"])
        and len(lineage["gateways"]) == 2
        and bool(rollouts)
        and rollouts[0]["state"] == "completed"
        # all three steps: the wave's may be redelivered after the completion (handled at
        # once, it can come before its rollout.started is projected)
        and len(rollouts[0]["history"]) == 3
    )


async def test_lineage_follows_the_events_and_a_replay_rebuilds_it_identically(
    registry: RegistryUnderTest, bus: Bus
) -> None:
    digest = (await registry.upload(gguf_bytes())).json()["digest"]
    assert (await registry.publish(digest)).status_code == 201
    for payload in pipeline_story(digest):
        await bus.publish(new_event(payload, source="/slmops/test"))

    live = await lineage_when(registry.client, complete)
    # a page that only counts gateways elsewhere may leave their states out
    lean = (await registry.client.get(f"/v1/models/{NAME}/{VERSION}/lineage",
                                      params={"gateways": "false"})).json()  # fmt: skip
    assert lean == {**live, "gateways": {}}
    rebuilt_counts = (await registry.client.post("/v1/admin/lineage/rebuild")).json()
    rebuilt = await lineage_when(registry.client, complete)

    assert rebuilt == live
    assert rebuilt_counts["replayed"] == {
        "SLMOPS_PIPELINE": 7,
        "SLMOPS_ROLLOUT": 3,
        "SLMOPS_FLEET": 3,
    }
    variants = {v["variant_id"]: v for v in live["variants"]}
    assert variants["v-x86"]["status"] == "validated"
    assert variants["v-arm"]["status"] == "rejected"
    assert variants["v-arm"]["reports"][0]["reason"] == "cosine 0.91 < 0.98"
    assert variants["v-x86"]["size_bytes"] == 500
    assert live["optimization_failures"][0]["reason"] == "no calib"
    assert live["releases"][0]["entries"][1]["variant_id"] is None
    assert [step["type"] for step in live["rollouts"][0]["history"]] == [
        "slmops.rollout.started.v1",
        "slmops.rollout.wave.started.v1",
        "slmops.rollout.completed.v1",
    ]
    assert live["gateways"]["gw-1"]["state"] == "applied"
    assert live["gateways"]["gw-2"] == {**live["gateways"]["gw-2"], "state": "failed",
                                        "reason": "smoke test failed"}  # fmt: skip
    assert live["published"]["artifact"]["digest"] == digest


async def test_a_rebuild_swaps_into_the_live_index_without_wiping_it(
    registry: RegistryUnderTest, bus: Bus
) -> None:
    digest = (await registry.upload(gguf_bytes())).json()["digest"]
    await registry.publish(digest)
    live = await lineage_when(registry.client, lambda lineage: lineage["published"] is not None)
    index = await bus.js.key_value(LINEAGE_KV.bucket)
    await index.put("model.ghost.1-0-0", b'{"stale": true}')  # nothing in the log made it
    created = (await bus.js.stream_info(LINEAGE_KV.stream)).created

    rebuilt = await registry.client.post("/v1/admin/lineage/rebuild")

    assert rebuilt.status_code == 200
    assert (await bus.js.stream_info(LINEAGE_KV.stream)).created == created  # never wiped
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await index.get("model.ghost.1-0-0")
    with pytest.raises(nats.js.errors.NotFoundError):  # the aside bucket is gone
        await bus.js.stream_info(f"KV_{LINEAGE_KV.bucket}-next")
    after = (await registry.client.get(f"/v1/models/{NAME}/{VERSION}/lineage")).json()
    assert after == live


async def test_a_replay_ends_at_a_deleted_last_message_and_a_stalled_one_changes_nothing(
    registry: RegistryUnderTest, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = (await registry.upload(gguf_bytes())).json()["digest"]
    await registry.publish(digest)
    for payload in pipeline_story(digest):
        await bus.publish(new_event(payload, source="/slmops/test"))
    live = await lineage_when(registry.client, complete)
    fleet = await bus.js.stream_info("SLMOPS_FLEET")
    await bus.js.delete_msg("SLMOPS_FLEET", fleet.state.last_seq)  # gw-2's health report
    assert (await bus.js.stream_info("SLMOPS_FLEET")).state.last_seq == fleet.state.last_seq

    gap = await registry.client.post("/v1/admin/lineage/rebuild")

    assert gap.status_code == 200, gap.text
    assert gap.json()["replayed"]["SLMOPS_FLEET"] == 2
    assert await lineage_when(registry.client, complete) == live

    # a stream that stops delivering half way: the rebuild stops, the live index stays whole
    index = await bus.js.key_value(LINEAGE_KV.bucket)
    await index.put("model.ghost.1-0-0", b'{"stale": true}')  # a swap would delete it
    runtime = registry.context.runtime
    assert runtime is not None
    assert runtime.bus is not None
    js, subscribe = runtime.bus.js, runtime.bus.js.subscribe

    async def stalling(*args: Any, **kwargs: Any) -> Any:
        sub = await subscribe(*args, **kwargs)

        async def silent(timeout: float) -> Any:  # noqa: ASYNC109 - next_msg's own signature
            await asyncio.sleep(timeout)
            raise nats.errors.TimeoutError

        sub.next_msg = silent
        return sub

    monkeypatch.setattr(js, "subscribe", stalling)
    monkeypatch.setattr(rebuild_module, "STALL_S", 0.3)

    stalled = await registry.client.post("/v1/admin/lineage/rebuild")

    assert stalled.status_code == 503
    assert "the live lineage index is left as it was" in stalled.json()["detail"]
    assert (await index.get("model.ghost.1-0-0")).value == b'{"stale": true}'
    assert (await registry.client.get(f"/v1/models/{NAME}/{VERSION}/lineage")).json() == live


async def test_wiped_index_is_empty_until_replayed(registry: RegistryUnderTest, bus: Bus) -> None:
    digest = (await registry.upload(gguf_bytes())).json()["digest"]
    await registry.publish(digest)
    await lineage_when(registry.client, lambda lineage: lineage["published"] is not None)
    await bus.js.delete_key_value(LINEAGE_KV.bucket)
    await bus.declare_kv(LINEAGE_KV)

    missing = await registry.client.get(f"/v1/models/{NAME}/{VERSION}/lineage")
    await registry.client.post("/v1/admin/lineage/rebuild")
    restored = await lineage_when(registry.client, lambda lineage: lineage["published"] is not None)

    assert missing.status_code == 404
    assert restored["published"]["artifact"]["digest"] == digest


async def test_lineage_of_an_unknown_version_is_404(registry: RegistryUnderTest) -> None:
    response = await registry.client.get("/v1/models/nope/1/lineage")

    assert response.status_code == 404
    assert response.json()["detail"] == "no model nope version 1"


async def channels_when(
    client: httpx.AsyncClient, predicate: Any, timeout_s: float = 20
) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: list[dict[str, Any]] = []
    while asyncio.get_running_loop().time() < deadline:
        last = (await client.get(f"/v1/channels/{NAME}")).json()
        if predicate(last):
            return last
        await asyncio.sleep(0.1)
    raise TimeoutError(f"channels never got there; last: {last}")


async def test_channels_move_with_releases_rollouts_and_the_api(
    registry: RegistryUnderTest, bus: Bus
) -> None:
    digest = (await registry.upload(gguf_bytes())).json()["digest"]
    await registry.publish(digest)
    for payload in pipeline_story(digest):
        await bus.publish(new_event(payload, source="/slmops/test"))
    await lineage_when(registry.client, complete)

    def x86(books: list[dict[str, Any]]) -> dict[str, Any]:
        return next((b for b in books if b["device_class"] == "x86-vnni"), {"channels": {}})

    after_rollout = await channels_when(registry.client, lambda b: "stable" in x86(b)["channels"])
    moved = await registry.client.put(
        f"/v1/channels/{NAME}/x86-vnni/pinned",
        json={"version": VERSION, "variant_id": "v-x86", "reason": "field test"},
    )
    after_api = await channels_when(registry.client, lambda b: "pinned" in x86(b)["channels"])
    refused = await registry.client.put(
        f"/v1/channels/{NAME}/x86-vnni/stable", json={"version": VERSION, "variant_id": "v-arm"}
    )
    await registry.client.post("/v1/admin/lineage/rebuild")
    rebuilt = await channels_when(registry.client, lambda b: "pinned" in x86(b)["channels"])

    channels = x86(after_rollout)["channels"]
    assert channels["canary"]["variant_id"] == "v-x86"
    assert channels["canary"]["cause"] == "slmops.release.created.v1"
    assert channels["stable"]["variant_id"] == "v-x86"
    assert channels["stable"]["cause"] == "slmops.rollout.completed.v1"
    assert moved.status_code == 202
    pinned = x86(after_api)["channels"]["pinned"]
    assert (pinned["variant_id"], pinned["moved_by"], pinned["reason"]) == (
        "v-x86",
        "test:everything",  # the principal that moved it: the audit trail
        "field test",
    )
    assert [m["channel"] for m in x86(after_api)["history"]] == ["canary", "stable", "pinned"]
    assert refused.status_code == 422
    assert "no variant v-arm for x86-vnni" in refused.json()["detail"]
    assert rebuilt == after_api
    assert all(b["device_class"] != "arm64" for b in after_api)  # arm64 had nothing released


async def test_a_failed_release_is_in_the_lineage_as_no_release_and_moves_no_channel(
    registry: RegistryUnderTest, bus: Bus
) -> None:
    # setup: a version whose every candidate failed validation, then its release.failed
    digest = (await registry.upload(gguf_bytes())).json()["digest"]
    assert (await registry.publish(digest)).status_code == 201
    common = {"model_name": NAME, "version": VERSION}
    failed = ReleaseFailed(**common, release_id="rel-1", entries=[
        ReleaseEntry(device_class="x86-vnni", reason="no variant passed validation (int8: ...)"),
        ReleaseEntry(device_class="npu", reason="no candidates: no recipe for gguf"),
    ])  # fmt: skip

    # execute
    await bus.publish(new_event(failed, source="/slmops/test"))
    live = await lineage_when(registry.client, lambda doc: doc["release_failed"] is not None)
    await registry.client.post("/v1/admin/lineage/rebuild")
    rebuilt = await lineage_when(registry.client, lambda doc: doc["release_failed"] is not None)

    # assert: kept apart from releases, with the reason per class; replayed the same
    assert live["releases"] == []
    reasons = {e["device_class"]: e["reason"] for e in live["release_failed"]["entries"]}
    assert reasons == {"x86-vnni": "no variant passed validation (int8: ...)",
                       "npu": "no candidates: no recipe for gguf"}  # fmt: skip
    assert live["release_failed"]["release_id"] == "rel-1"
    assert rebuilt == live
    assert (await registry.client.get(f"/v1/channels/{NAME}")).json() == []  # no canary moved
