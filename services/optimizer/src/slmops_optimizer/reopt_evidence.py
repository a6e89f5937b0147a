"""What the registry knows of the candidates of a re-optimization: each one's figure for the
regressed metric as the class's devices measured it (a variant that ran in the field before,
``GET /v1/variants/{id}/field``), its host figure against the regressed variant's, its size.

A ratio is only taken between two figures measured on one host for one class: the class's own
validation reports when its latency is measurable on the validator's host, else those of a
host-measurable class that has both recipes built (the same recipe of the same parent; a
class's latency on its device differs from the host's, but which of two recipes is faster
rarely flips). Sizes come from the variants the class already has.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import ValidationError

from slmops.events import variant_id_for
from slmops.events.payloads import FieldEvidence, Recipe
from slmops.profiles import DeviceProfile
from slmops.reports import ValidationReport
from slmops.service.registry_api import RegistryClient
from slmops.telemetry.budgets import METRICS_BY_NAME
from slmops_optimizer.reoptimize import Candidate, Known

log = logging.getLogger(__name__)


async def known_figures(
    registry: RegistryClient,
    evidence: FieldEvidence,
    parent_digest: str,
    regressed_recipe: Recipe | None,
    candidates: list[Candidate],
    profiles: dict[str, DeviceProfile],
) -> dict[str, Known]:
    """Candidate variant id -> what is known of it (missing: nothing is)."""
    metric = METRICS_BY_NAME.get(evidence.metric)
    gate = metric.host_gate if metric else None
    sizes = await asyncio.gather(*(_size_mb(registry, c.variant_id) for c in candidates))
    fielded = await asyncio.gather(
        *(_field_figure(registry, c.variant_id, evidence) for c in candidates)
    )
    ratios: dict[str, tuple[float, str]] = {}
    if gate is not None:
        for device_class in _host_classes(evidence.device_class, profiles):
            wanted = [c for c in candidates if c.variant_id not in ratios]
            if not wanted:
                break
            found = await _ratios_in(registry, evidence, gate, parent_digest, regressed_recipe,
                                     wanted, device_class)  # fmt: skip
            ratios.update(found)
    known: dict[str, Known] = {}
    for candidate, size, field_value in zip(candidates, sizes, fielded, strict=True):
        ratio, basis = ratios.get(candidate.variant_id, (None, ""))
        if field_value is not None:
            basis = f"measured by the {evidence.device_class} devices"
        if ratio is not None or size is not None or field_value is not None:
            known[candidate.variant_id] = Known(ratio=ratio, basis=basis, size_mb=size,
                                                field_value=field_value)  # fmt: skip
    return known


async def _field_figure(
    registry: RegistryClient, variant_id: str, evidence: FieldEvidence
) -> float | None:
    """The regressed metric as the class's devices measured this variant, if they did."""
    body = await registry.variant_field(variant_id)
    for measured in (body or {}).get("classes", []):
        if measured.get("device_class") == evidence.device_class:
            value = ((measured.get("measured") or {}).get("figures") or {}).get(evidence.metric)
            return float(value) if value is not None else None
    return None


def _host_classes(target: str, profiles: dict[str, DeviceProfile]) -> list[str]:
    """The class itself first, then the classes whose figures the validator's host measures."""
    others = sorted(n for n, p in profiles.items() if p.latency_measurable_on_host and n != target)
    return [target, *others]


async def _ratios_in(
    registry: RegistryClient,
    evidence: FieldEvidence,
    gate: str,
    parent_digest: str,
    regressed_recipe: Recipe | None,
    candidates: list[Candidate],
    device_class: str,
) -> dict[str, tuple[float, str]]:
    target = device_class == evidence.device_class
    if target:
        regressed_id = evidence.variant_id
    elif regressed_recipe is not None:
        regressed_id = variant_id_for(parent_digest, regressed_recipe, device_class)
    else:
        return {}
    ids = [c.variant_id if target else variant_id_for(parent_digest, c.recipe, device_class)
           for c in candidates]  # fmt: skip
    figures = await asyncio.gather(*(_host_figure(registry, v, gate) for v in [regressed_id, *ids]))
    reference = figures[0]
    if reference is None and target:
        reference = evidence.host_value  # the finding carries what the validator measured
    if not reference:
        return {}
    basis = f"{gate} on the validator's host, class {device_class}"
    return {
        c.variant_id: (figure / reference, basis)
        for c, figure in zip(candidates, figures[1:], strict=True)
        if figure is not None
    }


async def _host_figure(registry: RegistryClient, variant_id: str, gate: str) -> float | None:
    """The newest validation report's figure for ``gate``; None when not measured there."""
    body = await registry.variant_report(variant_id)
    if body is None:
        return None
    try:
        report = ValidationReport.model_validate(body.get("report") or {})
    except ValidationError:
        log.warning("variant %s: unreadable validation report; its figures left out", variant_id)
        return None
    found = report.gate(gate)
    return found.value if found is not None and found.value else None


async def _size_mb(registry: RegistryClient, variant_id: str) -> float | None:
    signed: dict[str, Any] | None = await registry.variant(variant_id)
    if signed is None:
        return None
    size = (signed["manifest"].get("metrics") or {}).get("size_mb")
    return float(size) if size is not None else None
