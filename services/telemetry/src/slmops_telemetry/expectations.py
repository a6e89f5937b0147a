"""What the field is judged against, per (variant, device class): the class's budgets, the
figures the validator measured on its host (or could not), and the drift baseline of the
variant's validation report."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from pydantic import ValidationError

from slmops.profiles import Budgets, DeviceProfile
from slmops.reports import ValidationReport
from slmops.service.registry_api import RegistryClient
from slmops.telemetry.budgets import FIELD_METRICS
from slmops.telemetry.drift import DriftSignature

log = logging.getLogger(__name__)
_CACHE_SIZE = 4096  # variants whose reports are kept: one entry is a few hundred bytes


@dataclass(frozen=True)
class HostFigures:
    """What one validation report says about the variant: per field metric the host's value
    (None: not measurable there, or no such gate), the drift baseline, the report's digest."""

    values: dict[str, float | None] = field(default_factory=dict)
    drift_baseline: DriftSignature | None = None
    report_digest: str | None = None


@dataclass(frozen=True)
class Expectations:
    variant_id: str
    device_class: str
    budgets: Budgets
    host: HostFigures = field(default_factory=HostFigures)

    def host_value(self, metric: str) -> float | None:
        return self.host.values.get(metric)

    @property
    def drift_baseline(self) -> DriftSignature | None:
        return self.host.drift_baseline

    @property
    def report_digest(self) -> str | None:
        return self.host.report_digest


def host_figures(report: ValidationReport, report_digest: str | None) -> HostFigures:
    values: dict[str, float | None] = {}
    for metric in FIELD_METRICS:
        gate = report.gate(metric.host_gate) if metric.host_gate else None
        values[metric.name] = gate.value if gate is not None else None
    return HostFigures(values, report.drift_baseline, report_digest)


# A stored report never changes: one registry call per variant for the life of the process.
_reports: OrderedDict[str, HostFigures] = OrderedDict()


async def expectations_for(
    registry: RegistryClient, profiles: dict[str, DeviceProfile], variant_id: str,
    device_class: str,
) -> Expectations | None:  # fmt: skip
    """None for a class without a profile; without a (readable) report, the budgets alone."""
    profile = profiles.get(device_class)
    if profile is None:
        return None
    host = _reports.get(variant_id)
    if host is None:
        host = await _fetch(registry, variant_id)
        if host is not None:
            _reports[variant_id] = host
            while len(_reports) > _CACHE_SIZE:
                _reports.popitem(last=False)
    return Expectations(variant_id, device_class, profile.budgets, host or HostFigures())


async def _fetch(registry: RegistryClient, variant_id: str) -> HostFigures | None:
    body = await registry.variant_report(variant_id)
    if body is None:
        return None  # not validated yet: asked again next time
    try:
        report = ValidationReport.model_validate(body["report"])
    except (KeyError, ValidationError) as exc:
        log.warning("the stored report of %s is not a validation report: %s", variant_id, exc)
        return HostFigures()  # it will not become one: remembered as empty
    manifest = body.get("manifest") or {}
    digest = manifest.get("digest") if isinstance(manifest, dict) else None
    return host_figures(report, digest if isinstance(digest, str) else None)
