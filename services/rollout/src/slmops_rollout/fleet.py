"""The fleet as the rollout service knows it: one record per gateway in JetStream KV.

Built from ``gateway.report``: registration gives class, labels and capabilities; applied and
failed reports say what each gateway runs; health reports keep the latest aggregates. Every
report refreshes ``last_seen``, so silent gateways can be timed out without blocking a wave.
A wave's outcomes are durable in its rollout's progress; the records take them back from
there when the records are loaded after a restart, instead of being written per gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from slmops.bus.kvstate import put_all
from slmops.bus.permissions import FLEET_RECORDS_BUCKET
from slmops.cohorts import overlay_for
from slmops.events.payloads import GatewayReport, HealthAggregate

__all__ = ["GATEWAYS_BUCKET", "Fleet", "GatewayRecord", "fold", "overlay_for"]
from slmops_rollout.state import RolloutState
from slmops_rollout.store import GroupCommit

GATEWAYS_BUCKET = FLEET_RECORDS_BUCKET
_BURST = 1000  # KV reads in flight at once
_WRITE_BURST = 5000  # records written pipelined at once


class GatewayRecord(BaseModel):
    gateway_id: str
    device_class: str
    labels: dict[str, str] = Field(default_factory=dict)
    capabilities: dict[str, Any] = Field(default_factory=dict)
    running_variant_id: str | None = None
    running_model_name: str | None = Field(
        None, description="The model it runs, when its reports name it (newer gateways)."
    )
    previous_variant_id: str | None = Field(
        None,
        description="What it ran before its current variant: where a rollback of the "
        "rollout that installed it (``last_rollout_id``) takes it, if it was not planned.",
    )
    generation: int | None = None
    last_kind: str = ""
    last_reason: str = ""
    last_rollout_id: str | None = None
    health: HealthAggregate | None = None
    health_variant_id: str | None = Field(None, description="The model the health is about.")
    last_seen: datetime = Field(default_factory=lambda: datetime.now(UTC))


def fold(record: GatewayRecord, report: GatewayReport, seen: datetime) -> None:
    """What one report changes in a gateway's record."""
    record.device_class, record.labels = report.device_class, dict(report.labels)
    record.last_seen, record.last_kind = seen, report.kind
    if report.kind == "registered":
        record.capabilities = dict(report.capabilities)
    elif report.kind in ("applied", "failed"):
        newer = record.generation is None or (report.generation or 0) >= record.generation
        if newer:
            record.generation, record.last_rollout_id = report.generation, report.rollout_id
            record.last_reason = report.reason
            if report.kind == "applied":
                _now_runs(record, report.variant_id, report.model_name)
    elif report.kind == "health":
        record.health, record.health_variant_id = report.health, report.variant_id


def _now_runs(record: GatewayRecord, variant_id: str | None, model_name: str | None) -> None:
    if variant_id != record.running_variant_id:
        record.previous_variant_id = record.running_variant_id
    record.running_variant_id, record.running_model_name = variant_id, model_name


class Fleet:
    """Every gateway's record, held in memory and written behind to KV.

    Loaded from KV once per process; each report changes the record in memory and its handler
    returns once the record is in KV (group commits: a burst of registrations or applied
    reports costs pipelined puts, not a read and a compare-and-set each). One rollout service
    instance writes the bucket (see ``store.py``).
    """

    def __init__(
        self, kv: KeyValue, rollouts: Callable[[], Awaitable[list[RolloutState]]] | None = None
    ) -> None:
        """``rollouts``: every rollout as loaded (their progress holds outcomes the records
        in KV may lack: ``_restore``)."""
        self.kv = kv
        self.rollouts = rollouts
        self.records: dict[str, GatewayRecord] = {}
        self._loaded = False
        self._loading = asyncio.Lock()
        self._commits = GroupCommit(self._write)

    async def all(self) -> list[GatewayRecord]:
        await self._load()
        return list(self.records.values())

    async def load(self) -> None:
        """Hold every record in memory (once per process)."""
        await self._load()

    def declared(self, report: GatewayReport) -> tuple[str, dict[str, str]] | None:
        """The class and labels the report's gateway declared in its own messages, as far as
        this fleet knows (``load`` first)."""
        record = self.records.get(report.gateway_id)
        return None if record is None else (record.device_class, record.labels)

    async def record(self, report: GatewayReport) -> GatewayRecord:
        """Fold ``report`` into its gateway's record; return once that is durable."""
        record = await self.fold(report)
        await self.commit([report.gateway_id])
        return record

    async def fold(self, report: GatewayReport, seen: datetime | None = None) -> GatewayRecord:
        """Fold ``report`` into its gateway's record in memory (``commit`` makes it durable)."""
        await self._load()
        record = self.records.get(report.gateway_id)
        if record is None:
            record = GatewayRecord(gateway_id=report.gateway_id, device_class=report.device_class)
            self.records[report.gateway_id] = record
        fold(record, report, seen or datetime.now(UTC))
        return record

    def _restore(self, states: Iterable[RolloutState]) -> None:
        """Outcomes the rollouts' progress holds that the records in KV may lack: a wave's
        applied and failed reports are not written per gateway when the progress says the
        same (``reports.py``). Oldest rollout first; a record that knows a newer generation
        keeps it."""
        for state in sorted(states, key=lambda s: s.started_at):
            for gateway_id, progress in state.gateways.items():
                record = self.records.get(gateway_id)
                if (record is None or progress.status not in ("applied", "failed")
                        or progress.generation is None
                        or (record.generation or -1) >= progress.generation):  # fmt: skip
                    continue
                record.generation, record.last_rollout_id = progress.generation, state.rollout_id
                record.last_kind, record.last_reason = progress.status, progress.reason
                desired = state.desired.get(progress.device_class)
                if progress.status == "applied" and desired is not None:
                    _now_runs(record, desired.variant_id, desired.model_name)

    async def commit(self, gateway_ids: Iterable[str]) -> None:
        """Return once the records of ``gateway_ids`` are in KV (one group commit)."""
        await self._commits.commit(gateway_ids)

    async def _load(self) -> None:
        if self._loaded:
            return
        async with self._loading:
            if self._loaded:
                return
            try:
                keys = await self.kv.keys()
            except nats.js.errors.NoKeysError:
                keys = []
            for start in range(0, len(keys), _BURST):
                batch = keys[start : start + _BURST]
                entries = await asyncio.gather(*(self.kv.get(k) for k in batch))
                for entry in entries:
                    record = GatewayRecord.model_validate_json(entry.value or b"{}")
                    self.records.setdefault(record.gateway_id, record)  # reports first: newer
            if self.rollouts is not None:
                self._restore(await self.rollouts())
            self._loaded = True

    async def _write(self, gateway_ids: set[str]) -> None:
        records = [self.records[g] for g in gateway_ids]
        for start in range(0, len(records), _WRITE_BURST):  # bounds what is buffered at once
            await put_all(self.kv, [(r.gateway_id, r.model_dump_json().encode())
                                    for r in records[start : start + _WRITE_BURST]])  # fmt: skip
