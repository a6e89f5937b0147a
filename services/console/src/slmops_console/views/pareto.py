"""A version's variants per device class as size against latency, coloured by quality, with
the class's budgets and the chosen variant: the Pareto front an operator decides on.

Figures come from each variant's latest validation report in the lineage (its gates: the
latency gate, the size gate and the first quality gate, a ``min``-bound one), falling back to
the optimizer's own measurements when a variant has no report yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Point:
    variant_id: str
    recipe: str
    size_mb: float | None
    latency_ms: float | None
    quality: float | None
    verdict: str  # passed | failed | pending
    chosen: bool = False


@dataclass
class ClassChart:
    device_class: str
    points: list[Point] = field(default_factory=list)
    latency_budget_ms: float | None = None
    size_budget_mb: float | None = None
    quality_name: str = "quality"
    quality_budget: float | None = None
    latency_note: str = ""  # why latency is missing (e.g. measured on the device, not here)

    def as_json(self) -> dict[str, Any]:
        return {
            "device_class": self.device_class,
            "points": [vars(p) for p in self.points],
            "latency_budget_ms": self.latency_budget_ms,
            "size_budget_mb": self.size_budget_mb,
            "quality_name": self.quality_name,
            "quality_budget": self.quality_budget,
        }


def _gate(gates: list[dict[str, Any]], *words: str) -> dict[str, Any] | None:
    """The first gate whose name holds a word, trying the words in order of preference."""
    for word in words:
        for gate in gates:
            if word in str(gate.get("name", "")).lower():
                return gate
    return None


def _latency_ms(gate: dict[str, Any] | None) -> float | None:
    if gate is None or gate.get("value") is None:
        return None
    value = float(gate["value"])
    return value * 1000 if gate.get("unit") == "s" else value


def _budget_from_ratio(
    latency: dict[str, Any] | None, ratio: dict[str, Any] | None
) -> float | None:
    """A budget given as a ratio to the reference (``p95 / fp32 p95 <= 1x``) in ms: the
    reference is the measured value over its ratio."""
    if not latency or not ratio or latency.get("value") is None:
        return None
    if not ratio.get("value") or ratio.get("budget") is None or "p95" not in latency["name"]:
        return None
    measured = _latency_ms(latency) or 0.0
    return measured / float(ratio["value"]) * float(ratio["budget"])


def charts(lineage: dict[str, Any]) -> list[ClassChart]:
    """One chart per device class of the version, classes in name order."""
    chosen = {
        e["variant_id"]
        for r in lineage.get("releases", [])
        for e in r["entries"]
        if e.get("variant_id")
    }
    by_class: dict[str, ClassChart] = {}
    for variant in lineage.get("variants", []):
        chart = by_class.setdefault(variant["device_class"], ClassChart(variant["device_class"]))
        reports = variant.get("reports") or []
        gates: list[dict[str, Any]] = reports[-1].get("gates", []) if reports else []
        # an encoder's p95, a decoder's time to first token; then whatever latency there is
        latency = _gate(gates, "latency.p95_ms", "ttft_ms", "latency.p50_ms", "latency")
        size = _gate(gates, "size")
        judged = [g for g in gates if g.get("bound") == "min"]
        quality = next((g for g in judged if g.get("budget") is not None), None) or next(
            iter(judged), None
        )
        size_mb = (variant["size_bytes"] / 1e6) if variant.get("size_bytes") else None
        point = Point(
            variant_id=variant["variant_id"],
            recipe=(variant.get("recipe") or {}).get("name", "?"),
            size_mb=size_mb,
            latency_ms=_latency_ms(latency),
            quality=float(quality["value"])
            if quality and quality.get("value") is not None
            else variant.get("metrics", {}).get("quick_cosine_mean"),
            verdict=reports[-1]["verdict"] if reports else "pending",
            chosen=variant["variant_id"] in chosen,
        )
        chart.points.append(point)
        if latency and latency.get("budget") is not None:
            budget_ms = _latency_ms({**latency, "value": latency["budget"]})
        else:
            budget_ms = _budget_from_ratio(latency, _gate(gates, "p95_ratio"))
        # A ratio budget is the reference's time, measured again with each variant: the
        # chosen variant's measurement is the one the release was decided on.
        if budget_ms is not None and (chart.latency_budget_ms is None or point.chosen):
            chart.latency_budget_ms = budget_ms
        if latency and latency.get("value") is None and latency.get("detail"):
            chart.latency_note = str(latency["detail"])
        if size and size.get("budget") is not None:
            budget = float(size["budget"])
            chart.size_budget_mb = budget / 1e6 if size.get("unit") in ("B", "bytes") else budget
        if quality:
            chart.quality_name = str(quality["name"])
            chart.quality_budget = quality.get("budget")
    return [by_class[name] for name in sorted(by_class)]
