"""The lineage index in JetStream KV: kept up to date from events, and rebuildable by replay.

Keys (tokens escaped like the version catalog's): ``model.<name>.<version>`` holds the
:class:`Lineage` document; ``rollout.<id>`` and ``variant.<id>`` say which model version an id
belongs to (rollout and gateway events do not name the model); ``gw.<name>.<version>.<gateway>``
holds the newest applied/failed state of each gateway, one key per gateway so a fleet of
thousands never makes one document outgrow a message. Updates are compare-and-set, so
parallel handlers never lose each other's changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import DeliverPolicy
from nats.js.kv import KeyValue

from slmops.bus import FLEET, LINEAGE_KV, PIPELINE, ROLLOUT, Bus
from slmops.events import (
    CloudEvent,
    GatewayReport,
    ModelPublished,
    OptimizationCompleted,
    OptimizationFailed,
    ReleaseCreated,
    RolloutCompleted,
    RolloutPaused,
    RolloutResumed,
    RolloutRolledBack,
    RolloutStarted,
    RolloutWaveStarted,
    TransientError,
    ValidationFailed,
    ValidationPassed,
    decode_event,
)
from slmops.events.errors import EventDecodeError
from slmops_registry.catalog import token
from slmops_registry.lineage import GatewayState, Lineage, apply_event, gateway_state

log = logging.getLogger(__name__)
_CAS_ATTEMPTS = 20
#: What the lineage is made of (everything else on these streams is not lineage).
PROJECTED = (
    ModelPublished,
    OptimizationCompleted,
    OptimizationFailed,
    ValidationPassed,
    ValidationFailed,
    ReleaseCreated,
    RolloutStarted,
    RolloutWaveStarted,
    RolloutPaused,
    RolloutResumed,
    RolloutCompleted,
    RolloutRolledBack,
    GatewayReport,
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

    async def update(self, name: str, version: str, event: CloudEvent[Any]) -> None:
        """Fold ``event`` into the version's document with compare-and-set retries."""
        key = self.model_key(name, version)
        for _ in range(_CAS_ATTEMPTS):
            try:
                entry = await self.kv.get(key)
                lineage, revision = Lineage.model_validate_json(entry.value or b""), entry.revision
            except nats.js.errors.KeyNotFoundError:
                lineage, revision = Lineage(model_name=name, version=version), None
            if not apply_event(lineage, event):
                return
            value = lineage.model_dump_json().encode()
            try:
                if revision is None:
                    await self.kv.create(key, value)
                else:
                    await self.kv.update(key, value, last=revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # someone else updated it first: re-read and fold again
        raise TransientError(f"lineage of {name} {version} kept changing under {event.id}")

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
        """Keep the newest state per gateway (by event time, then id)."""
        key = f"gw.{token(name)}.{token(version)}.{state.gateway_id}"
        for _ in range(_CAS_ATTEMPTS):
            try:
                entry = await self.kv.get(key)
                current = GatewayState.model_validate_json(entry.value or b"")
                if current.key() >= state.key():
                    return
                revision: int | None = entry.revision
            except nats.js.errors.KeyNotFoundError:
                revision = None
            try:
                value = state.model_dump_json().encode()
                if revision is None:
                    await self.kv.create(key, value)
                else:
                    await self.kv.update(key, value, last=revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise TransientError(f"gateway state {key} kept changing")

    async def gateways(self, name: str, version: str) -> list[GatewayState]:
        watcher = await self.kv.watch(f"gw.{token(name)}.{token(version)}.*", ignore_deletes=True)
        states = []
        try:
            while (entry := await watcher.updates(timeout=5)) is not None:  # type: ignore[no-untyped-call]
                states.append(GatewayState.model_validate_json(entry.value or b""))
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return states


async def project(store: LineageStore, event: CloudEvent[Any]) -> None:
    """Route one event to the model version it belongs to and fold it in."""
    if not isinstance(event.data, PROJECTED):
        return
    data: Any = event.data  # each branch below reads the fields its event types have
    if isinstance(data, GatewayReport):
        state = gateway_state(event)
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


async def rebuild(bus: Bus) -> dict[str, int]:
    """Wipe the index and replay every stream the registry projects, in stream order."""
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await bus.js.delete_key_value(LINEAGE_KV.bucket)
    store = LineageStore(await bus.declare_kv(LINEAGE_KV))
    counts: dict[str, int] = {}
    for stream in (PIPELINE, ROLLOUT, FLEET):  # model and variant ids are indexed first
        counts[stream.name] = await _replay(bus, store, stream.name)
    return counts


async def _replay(bus: Bus, store: LineageStore, stream: str) -> int:
    info = await bus.js.stream_info(stream)
    last_seq, replayed = info.state.last_seq, 0
    if info.state.messages == 0:
        return 0
    sub = await bus.js.subscribe(
        ">", stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            try:
                event = decode_event(msg.data)
            except EventDecodeError:
                event = None  # poison is in the dead-letter stream already; not lineage
            if event is not None and isinstance(event.data, PROJECTED):
                await project(store, event)
                replayed += 1
            if msg.metadata.sequence.stream >= last_seq:
                return replayed
    except nats.errors.TimeoutError:
        log.warning("replay of %s stopped early at a gap before seq %s", stream, last_seq)
        return replayed
    finally:
        await sub.unsubscribe()
