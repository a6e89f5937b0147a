"""The fleet as the rollout service knows it: one record per gateway in JetStream KV.

Built from ``gateway.report``: registration gives class, labels and capabilities; applied and
failed reports say what each gateway runs; health reports keep the latest aggregates. Every
report refreshes ``last_seen``, so silent gateways can be timed out without blocking a wave.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from slmops.bus.kvstate import update_model
from slmops.events.payloads import GatewayReport, HealthAggregate
from slmops_rollout.plans import Overlay, matches

GATEWAYS_BUCKET = "slmops-gateways"


class GatewayRecord(BaseModel):
    gateway_id: str
    device_class: str
    labels: dict[str, str] = Field(default_factory=dict)
    capabilities: dict[str, Any] = Field(default_factory=dict)
    running_variant_id: str | None = None
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
                record.running_variant_id = report.variant_id
    elif report.kind == "health":
        record.health, record.health_variant_id = report.health, report.variant_id


def overlay_for(labels: dict[str, str], overlays: Iterable[Overlay]) -> dict[str, int]:
    """The settings of every overlay whose selector matches, later ones winning."""
    merged: dict[str, int] = {}
    for overlay in overlays:
        if matches(labels, overlay.selector):
            merged.update(overlay.settings)
    return merged


async def record_report(kv: KeyValue, report: GatewayReport) -> GatewayRecord:
    seen = datetime.now(UTC)
    return await update_model(
        kv, report.gateway_id, GatewayRecord,
        lambda record: fold(record, report, seen),
        lambda: GatewayRecord(gateway_id=report.gateway_id, device_class=report.device_class),
    )  # fmt: skip
