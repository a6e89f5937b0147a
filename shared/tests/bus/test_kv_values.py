"""KV beyond one key at a time (real NATS): listing values by key pattern (current values only,
deleted keys left out, every value there even right after it was written) and pipelined
writes of many keys."""

from __future__ import annotations

import asyncio

import nats.js.errors
import pytest

from slmops.bus import Bus
from slmops.bus.kvstate import put_all, put_many, values_matching

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


async def test_put_many_writes_every_key_and_reports_refused_creates(bus: Bus) -> None:
    # setup: one key exists already
    kv = await bus.key_value("slmops-jobs")
    await kv.put("many.taken", b"first")
    items = [(f"many.new.{i}", b"%d" % i) for i in range(2_000)] + [("many.taken", b"again")]

    # execute: create only - the present key is refused, the others written
    results = await put_many(kv, items, create=True)

    # assert
    revisions, refused = results[:-1], results[-1]
    assert all(isinstance(r, int) for r in revisions)
    assert isinstance(refused, nats.js.errors.KeyWrongLastSequenceError)
    assert (await kv.get("many.taken")).value == b"first"
    assert sorted(await values_matching(kv, "many.new.*")) == sorted(v for _, v in items[:-1])


async def test_put_all_overwrites_and_the_newest_value_wins(bus: Bus) -> None:
    kv = await bus.key_value("slmops-jobs")
    await kv.put("all.a", b"old")

    await put_all(kv, [("all.a", b"new"), ("all.b", b"b")])

    assert (await kv.get("all.a")).value == b"new"
    assert (await kv.get("all.b")).value == b"b"


async def test_put_many_into_a_bucket_that_is_gone_fails_each_item(bus: Bus) -> None:
    kv = await bus.key_value("slmops-jobs")
    kv._pre = "$KV.no-such-bucket."  # what a deleted bucket looks like to a writer

    results = await put_many(kv, [("x", b"1"), ("y", b"2")], timeout_s=5)

    assert [type(r) for r in results] == [nats.js.errors.NoStreamResponseError] * 2
