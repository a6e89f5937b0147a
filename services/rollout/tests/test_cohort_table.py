"""The cohort table on a real NATS: a rollout withdrawn fleet-wide never comes back (a chunk
still in flight included), and a cohort state's generation only rises."""

from __future__ import annotations

import pytest

from slmops.bus import Bus
from slmops.cohorts import CohortEntry
from slmops.events.payloads import ArtifactRef, DesiredModel
from slmops_rollout.cohorts import CohortTable

pytestmark = [pytest.mark.integration]


def _entry(rollout_id: str, generation: int, device_class: str = "cpu") -> CohortEntry:
    desired = DesiredModel(
        model_name="m", version="2.0.0", variant_id="v-2", manifest_digest="sha256:" + "a" * 64,
        artifact=ArtifactRef(digest="sha256:" + "b" * 64, size_bytes=1, uri="s3://b/x"),
    )  # fmt: skip
    return CohortEntry(rollout_id=rollout_id, generation=generation, device_class=device_class,
                       desired=desired)  # fmt: skip


async def test_a_withdrawn_rollout_stays_out_and_generations_only_rise(bus: Bus) -> None:
    kv = await bus.key_value("slmops-cohorts")
    table = CohortTable(kv, bus, None)
    await table.reach({7: [_entry("ro-kept", 3, "gpu")], 8: [_entry("ro-back", 10)]}, 10)
    await table.reach({7: [_entry("ro-back", 10)]}, 10)

    # execute: a fleet rollback (its generation drawn before a later write landed), then a
    # chunk of the same rollout that was still in flight, then its last wave's rest
    await table.withdraw("ro-back", 9)
    await table.reach({8: [_entry("ro-back", 11)]}, 11)
    await table.reach_rest([_entry("ro-back", 12)], 12)

    # assert: gone from every cohort, in memory and in KV; the other rollout's entry stays;
    # each state's generation rose past what its gateways saw
    reloaded = CohortTable(kv, bus, None)
    await reloaded.load()
    for view in (table, reloaded):
        assert not any(view.holds(c, "ro-back", "cpu") for c in range(1024))
        assert view.holds(7, "ro-kept", "gpu")  # another class's entry: kept
        assert view.state(7).generation > 10
        assert view.state(8).generation > 10
