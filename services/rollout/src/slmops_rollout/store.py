"""Where rollout state lives: JetStream KV, as a small header plus shards of gateway progress.

One KV value per rollout does not scale: 10,000 gateways of progress are megabytes (over
NATS's 1 MB message limit), and rewriting all of it per report is quadratic. The header
(status, wave, policy, what to install) is ``rollout.<id>``; each gateway's progress sits in
one of ``progress.<id>.<n>``, chosen by a hash of its id, at most ``SHARD_SIZE`` per shard.
Only the shards a change touched are written.

Writes are group commits: a report is folded into the in-memory state at once and its handler
waits until a write that includes it is durable (then its message is acked). Reports that
arrive while a write is under way share the next one, so a burst of 10,000 acknowledgements
costs a handful of KV writes, not 10,000.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import Awaitable, Callable, Iterable

import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field, TypeAdapter

from slmops_rollout.state import GatewayProgress, RolloutState

SHARD_SIZE = 1000
_SHARD = TypeAdapter(dict[str, GatewayProgress])


class Header(BaseModel):
    """Everything of a rollout but its gateways' progress (and the waves derived from it)."""

    state: RolloutState = Field(description="With empty ``waves`` and ``gateways``.")
    shard_count: int = Field(ge=1)
    wave_count: int = Field(ge=0)


def shard_of(gateway_id: str, shard_count: int) -> int:
    return zlib.crc32(gateway_id.encode()) % shard_count


def _header_key(rollout_id: str) -> str:
    return f"rollout.{rollout_id}"


def _shard_key(rollout_id: str, shard: int) -> str:
    return f"progress.{rollout_id}.{shard}"


class RolloutStore:
    """Reads and writes whole rollouts, or just what changed."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self._layouts: dict[str, list[list[str]]] = {}  # rollout id -> gateway ids per shard

    def _layout(self, state: RolloutState, shard_count: int) -> list[list[str]]:
        """Which gateways each shard holds (a rollout's gateways never change)."""
        layout = self._layouts.get(state.rollout_id)
        if layout is None:
            layout = [[] for _ in range(shard_count)]
            for gateway_id in state.gateways:
                layout[shard_of(gateway_id, shard_count)].append(gateway_id)
            self._layouts[state.rollout_id] = layout
        return layout

    async def create(self, state: RolloutState) -> None:
        """Store a new rollout; raises ``KeyWrongLastSequenceError`` when it exists."""
        shard_count = shard_count_for(state)
        await self._write(state, range(shard_count), shard_count)
        await self.kv.create(_header_key(state.rollout_id), _header(state, shard_count))

    async def save(self, state: RolloutState, gateways: Iterable[str]) -> None:
        """Write the header and the shards holding ``gateways``."""
        shard_count = shard_count_for(state)
        shards = {shard_of(g, shard_count) for g in set(gateways)}
        await self._write(state, shards, shard_count)
        await self.kv.put(_header_key(state.rollout_id), _header(state, shard_count))

    async def load(self, rollout_id: str) -> RolloutState | None:
        try:
            entry = await self.kv.get(_header_key(rollout_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        header = Header.model_validate_json(entry.value or b"{}")
        shards = await asyncio.gather(
            *(self.kv.get(_shard_key(rollout_id, n)) for n in range(header.shard_count))
        )
        state = header.state
        state.waves = [[] for _ in range(header.wave_count)]
        for shard in shards:
            for gateway_id, progress in _SHARD.validate_json(shard.value or b"{}").items():
                state.gateways[gateway_id] = progress
                state.waves[progress.wave].append(gateway_id)
        for wave in state.waves:
            wave.sort()
        return state

    async def ids(self) -> list[str]:
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        return [k.removeprefix("rollout.") for k in keys if k.startswith("rollout.")]

    async def _write(self, state: RolloutState, shards: Iterable[int], shard_count: int) -> None:
        wanted = set(shards)
        if not wanted:
            return
        layout = self._layout(state, shard_count)
        members = {n: {g: state.gateways[g] for g in layout[n]} for n in wanted}
        await asyncio.gather(*(
            self.kv.put(_shard_key(state.rollout_id, n), _SHARD.dump_json(part, exclude_none=True))
            for n, part in members.items()
        ))  # fmt: skip


def shard_count_for(state: RolloutState) -> int:
    return max(1, math.ceil(len(state.gateways) / SHARD_SIZE))


def _header(state: RolloutState, shard_count: int) -> bytes:
    bare = state.model_copy(update={"waves": [], "gateways": {}})
    header = Header(state=bare, shard_count=shard_count, wave_count=len(state.waves))
    return header.model_dump_json().encode()


class GroupCommit:
    """Durable writes shared by everyone who changed something meanwhile: ``write`` gets the
    keys changed since the last write; every ``commit`` returns once a write covering its
    change is done (or raises that write's error)."""

    def __init__(self, write: Callable[[set[str]], Awaitable[None]]) -> None:
        self._write = write
        self._dirty: set[str] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._writer: asyncio.Task[None] | None = None

    async def commit(self, keys: Iterable[str] = ()) -> None:
        self._dirty.update(keys)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        await waiter

    async def _drain(self) -> None:
        while self._waiters:
            dirty, waiters = self._dirty, self._waiters
            self._dirty, self._waiters = set(), []
            try:
                await self._write(dirty)
            except Exception as exc:  # every waiter of this write learns it failed
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


class LiveRollout(GroupCommit):
    """A rollout in memory; ``commit(gateways)`` writes its header and those gateways' shards."""

    def __init__(self, store: RolloutStore, state: RolloutState) -> None:
        super().__init__(lambda gateways: store.save(state, gateways))
        self.state = state
