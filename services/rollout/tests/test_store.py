"""Rollout state in JetStream KV (real NATS): header plus shards, only touched shards
rewritten, and group commits that let a burst of reports share a few writes."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import pytest

from slmops.bus import Bus
from slmops.events.payloads import ArtifactRef, DesiredModel
from slmops_rollout.plans import WavePolicy, plan_waves
from slmops_rollout.state import GatewayProgress, RolloutState
from slmops_rollout.store import LiveRollout, RolloutStore

pytestmark = [pytest.mark.integration]
ART = ArtifactRef(digest="sha256:" + "a" * 64, size_bytes=1, uri="s3://b/x")
DESIRED = DesiredModel(model_name="m", version="1", variant_id="v-1",
                       manifest_digest="sha256:" + "b" * 64, artifact=ART)  # fmt: skip


def _state(count: int) -> RolloutState:
    gateways = [f"gw-{i:05d}" for i in range(count)]
    waves = plan_waves("ro-big", gateways, WavePolicy())
    progress = {g: GatewayProgress(wave=w, device_class="cpu", previous_variant_id="v-0")
                for w, wave in enumerate(waves) for g in wave}  # fmt: skip
    return RolloutState(rollout_id="ro-big", release_id="rel-1", model_name="m", version="1",
                        desired={"cpu": DESIRED}, waves=waves, gateways=progress)  # fmt: skip


async def test_a_large_rollout_round_trips_in_shards_and_writes_only_what_changed(
    bus: Bus,
) -> None:
    # setup: 2,500 gateways - one value would be ~400 KB, and rewritten per report
    kv = await bus.key_value("slmops-rollouts")
    store = RolloutStore(kv)
    state = _state(2500)
    await store.create(state)

    # execute: one gateway applies
    touched = state.waves[0][0]
    state.gateways[touched].status = "applied"
    state.gateways[touched].assigned_at = datetime.now(UTC)
    before = {n: (await kv.get(f"progress.ro-big.{n}")).revision for n in range(3)}
    await store.save(state, [touched])
    after = {n: (await kv.get(f"progress.ro-big.{n}")).revision for n in range(3)}
    loaded = await store.load("ro-big")

    # assert: three shards each under 1 MB; only the touched one rewritten; same state back
    assert {n for n in range(3) if before[n] != after[n]} == {store.shard_of("ro-big", touched)}
    assert store.shard_of("ro-big", touched) == 0  # the canary is sent first: shard 0
    for n in range(3):
        assert len((await kv.get(f"progress.ro-big.{n}")).value or b"") < 1_000_000
    assert loaded is not None
    assert loaded.gateways == state.gateways
    assert loaded.waves == state.waves  # in send order
    assert await store.ids() == ["ro-big"]


async def test_concurrent_commits_share_writes(bus: Bus) -> None:
    # setup
    store = RolloutStore(await bus.key_value("slmops-rollouts"))
    state = _state(1000)
    await store.create(state)
    writes = 0
    save = store.save

    async def counted(s: RolloutState, gateways: object) -> None:
        nonlocal writes
        writes += 1
        await save(s, gateways)  # type: ignore[arg-type]

    store.save = counted  # type: ignore[method-assign]
    commits = LiveRollout(store, state)

    # execute: 1,000 reports folded and committed at once
    async def report(gateway_id: str) -> None:
        state.gateways[gateway_id].status = "acknowledged"
        await commits.commit([gateway_id])

    await asyncio.gather(*(report(g) for g in state.gateways))

    # assert: every change durable, in a handful of writes
    loaded = await store.load("ro-big")
    assert loaded is not None
    assert {p.status for p in loaded.gateways.values()} == {"acknowledged"}
    assert 1 <= writes <= 5


async def test_shards_written_again_and_again_hold_every_change(bus: Bus) -> None:
    # setup: a rollout stored, then changed gateway by gateway as reports would change it
    store = RolloutStore(await bus.key_value("slmops-rollouts"))
    state = _state(1200)
    await store.create(state)
    rng = random.Random(3)
    ids = sorted(state.gateways)
    at = datetime.now(UTC)

    # execute: rounds of changes to a few gateways all over the rollout, one write each
    for round_ in range(12):
        changed = rng.sample(ids, 30)
        for gateway_id in changed:
            progress = state.gateways[gateway_id]
            progress.status = rng.choice(["assigned", "acknowledged", "applied", "failed"])
            progress.generation, progress.assigned_at = round_, at
            progress.reason = f"round {round_}" if progress.status == "failed" else ""
        await store.save(state, changed)
    state.status = "completed"
    last = ids[:3]
    for gateway_id in last:
        state.gateways[gateway_id].reason = "after it settled"
    await store.save(state, last)

    # assert: what a restarted service loads is the state as it is in memory
    loaded = await RolloutStore(store.kv).load("ro-big")
    assert loaded is not None
    assert loaded.gateways == state.gateways
    assert sum(p.status != "pending" for p in loaded.gateways.values()) > 200
