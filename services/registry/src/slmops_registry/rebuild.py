"""Rebuilding the lineage index from the event log, aside, then swapped in.

The live index is never wiped: readers (the API, garbage collection's reachability) always see
a whole lineage. The replay builds a fresh index in a bucket of its own; then each of its keys
replaces the live one (a key at a time, each whole), live keys the replay did not produce are
removed, and the events that arrived during the replay (already projected live, then possibly
overwritten by the swap) are projected again on top - projection is idempotent. The aside
bucket is then deleted. GC and a rebuild exclude each other (``RegistryContext``).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import nats.errors
import nats.js.errors
from nats.js.api import DeliverPolicy

from slmops.bus import FLEET, LINEAGE_KV, PIPELINE, ROLLOUT, Bus
from slmops.bus.kvstate import entries_matching
from slmops.events import decode_event
from slmops.events.errors import EventDecodeError
from slmops_registry.projection import PROJECTED, LineageStore, project

#: Where a rebuild builds (the only bucket the registry may create and delete).
ASIDE_KV = replace(
    LINEAGE_KV, bucket=f"{LINEAGE_KV.bucket}-next",
    description="A lineage index being rebuilt: swapped into slmops-lineage, then deleted.",
)  # fmt: skip
#: Model and variant ids are indexed first.
STREAMS = (PIPELINE, ROLLOUT, FLEET)
STALL_S = 10.0  # a replay that hears nothing this long while messages remain has stalled


async def rebuild(bus: Bus, live: LineageStore) -> dict[str, int]:
    """Replay every stream the registry projects into a fresh index, swap it into ``live``.
    Returns the events replayed per stream."""
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await bus.js.delete_key_value(ASIDE_KV.bucket)  # a rebuild that died half way
    aside = LineageStore(await bus.declare_kv(ASIDE_KV))
    counts: dict[str, int] = {}
    replayed_to: dict[str, int] = {}
    for stream in STREAMS:
        counts[stream.name], replayed_to[stream.name] = await _replay(bus, aside, stream.name)
    rebuilt, current = await entries_matching(aside.kv, ">"), await entries_matching(live.kv, ">")
    for key, value in rebuilt.items():
        if current.get(key) != value:
            await live.kv.put(key, value)
    for key in current.keys() - rebuilt.keys():
        await live.kv.delete(key)
    for stream in STREAMS:  # what arrived meanwhile, on top
        await _replay(bus, live, stream.name, after_seq=replayed_to[stream.name])
    await bus.js.delete_key_value(ASIDE_KV.bucket)
    return counts


class ReplayStalled(Exception):
    """A stream stopped delivering before the replay reached its end: the rebuild stops and the
    live index is left as it was (swapping in a partial index would delete live keys)."""


async def _replay(
    bus: Bus, store: LineageStore, stream: str, after_seq: int = 0
) -> tuple[int, int]:
    """Project ``stream``'s events after ``after_seq`` up to its last one now; returns how many
    were projected and the sequence replayed to."""
    info = await bus.js.stream_info(stream)
    last_seq, replayed = info.state.last_seq, 0
    if info.state.messages == 0 or last_seq <= after_seq:
        return 0, max(last_seq, after_seq)
    try:  # the messages after after_seq may all have been deleted: nothing to wait for then
        await bus.js.get_msg(stream, seq=after_seq + 1, subject=">", next=True)
    except nats.js.errors.NotFoundError:
        return 0, last_seq
    start = ({"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": after_seq + 1}
             if after_seq else {"deliver_policy": DeliverPolicy.ALL})  # fmt: skip
    sub = await bus.js.subscribe(">", stream=stream, ordered_consumer=True, **start)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=STALL_S)
            except nats.errors.TimeoutError:
                raise ReplayStalled(
                    f"the replay of {stream} heard nothing for {STALL_S:g} s before reaching "
                    f"seq {last_seq}; the live lineage index is left as it was, try again"
                ) from None
            try:
                event = decode_event(msg.data)
            except EventDecodeError:
                event = None  # poison is in the dead-letter stream already; not lineage
            if event is not None and isinstance(event.data, PROJECTED):
                await project(store, event)
                replayed += 1
            position = msg.metadata
            # the last message seen at the start, or none left (those after it were deleted)
            if position.sequence.stream >= last_seq or position.num_pending == 0:
                return replayed, last_seq
    finally:
        await sub.unsubscribe()
