"""The lineage index in JetStream KV: kept up to date from events, and rebuildable by replay.

Keys (tokens escaped like the version catalog's): ``model.<name>.<version>`` holds the
:class:`Lineage` document; ``rollout.<id>`` and ``variant.<id>`` say which model version an id
belongs to (rollout and gateway events do not name the model); ``gw.<name>.<version>.<gateway>``
holds the newest applied/failed state of each gateway, one key per gateway so a fleet of
thousands never makes one document outgrow a message. Updates are compare-and-set, so
parallel handlers never lose each other's changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import BaseModel

from slmops.bus.kvstate import put_many, values_matching
from slmops.events import (
    ChannelMoved,
    CloudEvent,
    FleetDriftDetected,
    FleetMeasured,
    FleetRegressionDetected,
    GatewayReport,
    ModelPublished,
    OptimizationCompleted,
    OptimizationFailed,
    ReleaseCreated,
    ReleaseFailed,
    RolloutCompleted,
    RolloutPaused,
    RolloutResumed,
    RolloutRolledBack,
    RolloutStarted,
    RolloutWaveStarted,
    TransientError,
    ValidationFailed,
    ValidationPassed,
)
from slmops.events.reports import StampedReport
from slmops_registry.catalog import token
from slmops_registry.channels import CANARY, STABLE, ChannelBook, Move
from slmops_registry.lineage import GatewayState, Lineage, apply_event, gateway_state

log = logging.getLogger(__name__)
_CAS_ATTEMPTS = 20
_WRITES_IN_FLIGHT = 256  # compare-and-set writes awaited together
M = TypeVar("M", bound=BaseModel)
#: What the lineage is made of (everything else on these streams is not lineage).
PROJECTED = (
    ModelPublished,
    OptimizationCompleted,
    OptimizationFailed,
    ValidationPassed,
    ValidationFailed,
    ReleaseCreated,
    ReleaseFailed,
    ChannelMoved,
    RolloutStarted,
    RolloutWaveStarted,
    RolloutPaused,
    RolloutResumed,
    RolloutCompleted,
    RolloutRolledBack,
    GatewayReport,
    FleetMeasured,
    FleetRegressionDetected,
    FleetDriftDetected,
)


class LineageStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @staticmethod
    def model_key(name: str, version: str) -> str:
        return f"model.{token(name)}.{token(version)}"

    async def get(self, name: str, version: str) -> Lineage | None:
        try:
            entry = await self.kv.get(self.model_key(name, version))
        except nats.js.errors.KeyNotFoundError:
            return None
        return Lineage.model_validate_json(entry.value or b"")

    async def _modify(
        self,
        key: str,
        model: type[M],
        change: Callable[[M | None], M | None],
        *,
        absent_first: bool = False,
    ) -> None:
        """Compare-and-set: read ``key``, let ``change`` return the new document (None: no
        change), and write it unless another writer got there first - then read and change
        again, so parallel handlers never lose each other's updates. ``absent_first``: the
        key is most likely new, so the first attempt creates it without reading it (one round
        trip instead of two; when it exists after all, the create fails and it is read)."""
        current: M | None
        revision: int | None
        for attempt in range(_CAS_ATTEMPTS):
            if absent_first and attempt == 0:
                current, revision = None, None
            else:
                try:
                    entry = await self.kv.get(key)
                    current = model.model_validate_json(entry.value or b"")
                    revision = entry.revision
                except nats.js.errors.KeyNotFoundError:
                    current, revision = None, None
            document = change(current)
            if document is None:
                return
            value = document.model_dump_json().encode()
            try:
                if revision is None:
                    await self.kv.create(key, value)
                else:
                    await self.kv.update(key, value, last=revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise TransientError(f"{key} kept changing; giving up for now")

    async def update(self, name: str, version: str, event: CloudEvent[Any]) -> None:
        """Fold ``event`` into the version's lineage document."""

        def fold(lineage: Lineage | None) -> Lineage | None:
            lineage = lineage or Lineage(model_name=name, version=version)
            return lineage if apply_event(lineage, event) else None

        await self._modify(self.model_key(name, version), Lineage, fold)

    async def move_channels(self, name: str, device_class: str, moves: list[Move]) -> None:
        def add(book: ChannelBook | None) -> ChannelBook | None:
            book = book or ChannelBook(model_name=name, device_class=device_class)
            changed = [book.add(move) for move in moves]
            return book if any(changed) else None

        await self._modify(f"channel.{token(name)}.{token(device_class)}", ChannelBook, add)

    async def channel_books(self, name: str) -> list[ChannelBook]:
        raws = await self._values(f"channel.{token(name)}.*")
        return [ChannelBook.model_validate_json(raw) for raw in raws]

    async def remember(self, kind: str, ident: str, name: str, version: str) -> None:
        await self.kv.put(f"{kind}.{token(ident)}", json.dumps([name, version]).encode())

    async def locate(self, kind: str, ident: str) -> tuple[str, str] | None:
        try:
            entry = await self.kv.get(f"{kind}.{token(ident)}")
        except nats.js.errors.KeyNotFoundError:
            return None
        name, version = json.loads(entry.value or b"[]")
        return str(name), str(version)

    async def put_gateway(self, name: str, version: str, state: GatewayState) -> None:
        """Keep the newest state per gateway (by event time, then id). A gateway reports on a
        version about once (applied, or failed), so its key is most likely new."""
        await self._modify(
            self._gateway_key(name, version, state.gateway_id),
            GatewayState,
            lambda current: state if current is None or state.key() > current.key() else None,
            absent_first=True,
        )

    async def put_gateways(self, states: Sequence[tuple[str, str, GatewayState]]) -> None:
        """``put_gateway`` for many (model name, version, state): the keys are most likely new,
        so all are created pipelined at once; only those that existed after all are read and
        compared one by one."""
        created = await put_many(self.kv, [
            (self._gateway_key(name, version, s.gateway_id), s.model_dump_json().encode())
            for name, version, s in states
        ], create=True)  # fmt: skip
        again = [item for item, result in zip(states, created, strict=True)
                 if isinstance(result, Exception)]  # fmt: skip
        for start in range(0, len(again), _WRITES_IN_FLIGHT):
            burst = again[start : start + _WRITES_IN_FLIGHT]
            await asyncio.gather(*(self.put_gateway(*item) for item in burst))

    @staticmethod
    def _gateway_key(name: str, version: str, gateway_id: str) -> str:
        return f"gw.{token(name)}.{token(version)}.{gateway_id}"

    async def _values(self, pattern: str) -> list[bytes]:
        """The current values of every key matching a subject ``pattern``."""
        return await values_matching(self.kv, pattern)

    async def all_lineages(self) -> list[Lineage]:
        return [Lineage.model_validate_json(raw) for raw in await self._values("model.*.*")]

    async def gateways(self, name: str, version: str) -> list[GatewayState]:
        raws = await self._values(f"gw.{token(name)}.{token(version)}.*")
        return [GatewayState.model_validate_json(raw) for raw in raws]


async def project(store: LineageStore, event: CloudEvent[Any]) -> None:
    """Route one event to the model version it belongs to and fold it in."""
    if not isinstance(event.data, PROJECTED):
        return
    data: Any = event.data  # each branch below reads the fields its event types have
    if isinstance(data, GatewayReport):
        state = gateway_state(StampedReport(data, event.id, event.time))
        if state is None:
            return
        where = await store.locate("rollout", data.rollout_id) if data.rollout_id else None
        where = where or (
            await store.locate("variant", data.variant_id) if data.variant_id else None
        )
        if where is None:
            raise TransientError(f"gateway report names unknown rollout/variant: {event.id}")
        await store.put_gateway(*where, state)
        return
    if event.type.startswith("slmops.rollout.") and not isinstance(data, RolloutStarted):
        where = await store.locate("rollout", data.rollout_id)
        if where is None:  # its rollout.started has not been projected yet
            raise TransientError(f"rollout {data.rollout_id} not known yet")
        await store.update(*where, event)
        if isinstance(data, RolloutCompleted | RolloutRolledBack):
            await _move_after_rollout(store, event, *where)
        return
    name, version = data.model_name, data.version
    if isinstance(data, RolloutStarted):
        await store.remember("rollout", data.rollout_id, name, version)
    if isinstance(data, OptimizationCompleted | ValidationPassed | ValidationFailed):
        await store.remember("variant", data.variant_id, name, version)
    if isinstance(data, ReleaseCreated):
        for entry in data.entries:
            if entry.variant_id:
                await store.remember("variant", entry.variant_id, name, version)
    await store.update(name, version, event)
    # A release makes its variants the canaries - not one proposed from field evidence: that
    # waits for an operator (the rollout service); its rollout completing makes it stable.
    if isinstance(data, ReleaseCreated) and data.proposal is None:
        for entry in data.entries:
            if entry.variant_id:
                move = _move(event, CANARY, version, entry.variant_id, entry.reason)
                await store.move_channels(name, entry.device_class, [move])
    if isinstance(data, ChannelMoved):
        move = _move(event, data.channel, version, data.variant_id, data.reason, data.moved_by)
        await store.move_channels(name, data.device_class, [move])


def _move(
    event: CloudEvent[Any],
    channel: str,
    version: str,
    variant_id: str,
    reason: str = "",
    moved_by: str = "",
) -> Move:
    return Move(
        event_id=event.id,
        time=event.time,
        channel=channel,
        version=version,
        variant_id=variant_id,
        cause=event.type,
        reason=reason,
        moved_by=moved_by or event.source,
    )


async def _move_after_rollout(
    store: LineageStore, event: CloudEvent[Any], name: str, version: str
) -> None:
    """A completed rollout makes its release ``stable``; a rollback points ``canary`` back."""
    data: Any = event.data
    lineage = await store.get(name, version)
    rollout = lineage.rollouts.get(data.rollout_id) if lineage else None
    release = lineage.releases.get(rollout.release_id or "") if lineage and rollout else None
    if lineage is None or release is None:
        raise TransientError(f"release of rollout {data.rollout_id} not known yet")
    if isinstance(data, RolloutCompleted):
        for entry in release.entries:
            if entry.variant_id:
                move = _move(event, STABLE, version, entry.variant_id, "rollout completed")
                await store.move_channels(name, entry.device_class, [move])
    elif data.to_variant_id and data.to_variant_id in lineage.variants:
        variant = lineage.variants[data.to_variant_id]
        move = _move(event, CANARY, version, variant.variant_id, f"rolled back: {data.reason}")
        await store.move_channels(name, variant.device_class, [move])
