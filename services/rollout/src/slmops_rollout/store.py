"""Where rollout state lives: JetStream KV, as a small header plus shards of gateway progress.

One KV value per rollout does not scale: 10,000 gateways of progress are megabytes (over
NATS's 1 MB message limit), and rewriting all of it per report is quadratic. The header
(status, wave, policy, what to install) is ``rollout.<id>``; the gateways' progress is cut into
``progress.<id>.<n>`` of ``SHARD_SIZE`` gateways each, in the order they are sent to. Reports
come back in roughly that order, so a burst of them dirties one or two shards, and only the
shards a change touched are written.

Writes are group commits: a report is folded into the in-memory state at once and its handler
waits until a write that includes it is durable (then its message is acked). Reports that
arrive while a write is under way share the next one, so a burst of 10,000 acknowledgements
costs a handful of KV writes, not 10,000.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime

import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field, TypeAdapter

from slmops.bus.kvstate import put_all
from slmops_rollout.state import GatewayProgress, RolloutState, WaveFigures
from slmops_rollout.tally import WaveTally

SHARD_SIZE = 250  # small: a batch of reports from all over a wave dirties few gateways per shard
_SHARD = TypeAdapter(dict[str, GatewayProgress])


class Header(BaseModel):
    """Everything of a rollout but its gateways' progress (and the waves derived from it)."""

    state: RolloutState = Field(description="With empty ``waves`` and ``gateways``.")
    shard_count: int = Field(ge=1)
    wave_count: int = Field(ge=0)


def _header_key(rollout_id: str) -> str:
    return f"rollout.{rollout_id}"


def _shard_key(rollout_id: str, shard: int) -> str:
    return f"progress.{rollout_id}.{shard}"


class RolloutStore:
    """Reads and writes whole rollouts, or just what changed."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self._layouts: dict[str, list[list[str]]] = {}  # rollout id -> gateway ids per shard
        self._shard_of: dict[str, dict[str, int]] = {}  # rollout id -> gateway id -> shard

    def _remember(self, rollout_id: str, layout: list[list[str]]) -> None:
        self._layouts[rollout_id] = layout
        self._shard_of[rollout_id] = {g: n for n, ids in enumerate(layout) for g in ids}

    def shard_of(self, rollout_id: str, gateway_id: str) -> int:
        return self._shard_of[rollout_id][gateway_id]

    async def create(self, state: RolloutState) -> None:
        """Store a new rollout; raises ``KeyWrongLastSequenceError`` when it exists."""
        layout = await self._write_all(state)
        await self.kv.create(_header_key(state.rollout_id), _header(state, len(layout)))

    async def replace(self, state: RolloutState) -> None:
        """Store a rollout whose waves were planned anew (a waiting one, once its gateways
        registered): every shard, then the header that points at them."""
        layout = await self._write_all(state)
        await self.kv.put(_header_key(state.rollout_id), _header(state, len(layout)))

    async def _write_all(self, state: RolloutState) -> list[list[str]]:
        order = [g for wave in state.waves for g in wave]  # the order they are sent to
        layout = [order[i : i + SHARD_SIZE] for i in range(0, len(order), SHARD_SIZE)] or [[]]
        self._remember(state.rollout_id, layout)
        await self._write(state, range(len(layout)))
        return layout

    async def save(self, state: RolloutState, gateways: Iterable[str]) -> None:
        """Write the header and the shards holding ``gateways``."""
        shard_of = self._shard_of[state.rollout_id]
        await self._write(state, {shard_of[g] for g in gateways})
        shard_count = len(self._layouts[state.rollout_id])
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
        layout: list[list[str]] = []
        for shard in shards:  # in send order: each wave's gateways come out in it
            part = _SHARD.validate_json(shard.value or b"{}")
            layout.append(list(part))
            for gateway_id, progress in part.items():
                state.gateways[gateway_id] = progress
                state.waves[progress.wave].append(gateway_id)
        self._remember(rollout_id, layout)
        return state

    async def ids(self) -> list[str]:
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        return [k.removeprefix("rollout.") for k in keys if k.startswith("rollout.")]

    async def _write(self, state: RolloutState, shards: Iterable[int]) -> None:
        layout = self._layouts[state.rollout_id]
        await put_all(self.kv, [
            (_shard_key(state.rollout_id, n),
             _SHARD.dump_json({g: state.gateways[g] for g in layout[n]}, exclude_none=True))
            for n in set(shards)
        ])  # fmt: skip


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
    """A rollout in memory; ``commit(gateways)`` writes its header and those gateways' shards.

    Every change of a gateway's progress is committed naming it, so the current wave's figures
    move with the commits (``tally.py``) instead of being counted afresh per tick."""

    def __init__(self, store: RolloutStore, state: RolloutState) -> None:
        super().__init__(lambda gateways: store.save(state, gateways))
        self.state = state
        self.tally = WaveTally()

    async def commit(self, keys: Iterable[str] = ()) -> None:
        keys = list(keys)
        self.tally.moved(self.state, keys)
        await super().commit(keys)

    def undone(self, gateway_ids: Iterable[str]) -> None:
        """Changes of these gateways were taken back before they were committed."""
        self.tally.moved(self.state, gateway_ids)

    def figures(self, now: datetime) -> WaveFigures:
        """The current wave's figures at ``now``."""
        return self.tally.figures(self.state, now)
