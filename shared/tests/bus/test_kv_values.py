"""Listing KV values by key pattern (real NATS): current values only, deleted keys left out,
and every value there even right after it was written."""

from __future__ import annotations

import asyncio

import pytest

from slmops.bus import Bus
from slmops.bus.kvstate import values_matching

pytestmark = [pytest.mark.integration]


async def test_values_matching_lists_current_values_without_deleted_keys(bus: Bus) -> None:
    # setup
    kv = await bus.key_value("slmops-jobs")
    await kv.put("report.v-1.a", b"first")
    await kv.put("report.v-1.a", b"second")  # the current value replaces the first
    await kv.put("report.v-1.b", b"other")
    await kv.put("report.v-1.c", b"gone")
    await kv.delete("report.v-1.c")
    await kv.put("report.v-2.a", b"not this variant")

    # execute
    found = await values_matching(kv, "report.v-1.*")
    none = await values_matching(kv, "report.v-9.*")

    # assert
    assert sorted(found) == [b"other", b"second"]
    assert none == []


async def test_a_value_written_just_before_is_always_listed(bus: Bus) -> None:
    # the race a KV watch loses under load: write, then list at once, many times over
    kv = await bus.key_value("slmops-jobs")

    async def write_then_list(i: int) -> list[bytes]:
        await kv.put(f"report.v-{i}.x", b"%d" % i)
        return await values_matching(kv, f"report.v-{i}.*")

    results = await asyncio.gather(*(write_then_list(i) for i in range(100)))

    assert results == [[b"%d" % i] for i in range(100)]
