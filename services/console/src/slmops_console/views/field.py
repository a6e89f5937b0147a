"""What the field measured, in words a page can show: a variant's figures on one class beside
the class's budget and the host's figure, each judged (pass / breach / not judged); drift
against the validation baseline; the findings and the evidence a proposal carries.

Pure: the telemetry service's ``ClassHealth`` rows, the lineage's ``field`` / ``findings`` and
the rollout service's proposals go in, plain rows come out (every state a word, never only a
colour).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slmops.telemetry.budgets import FIELD_METRICS

#: (figure of FieldFigures, label, unit): the order a table shows them in.
SHOWN = (
    ("gateways", "Gateways", ""),
    ("requests", "Requests", ""),
    ("error_rate", "Error rate", "%"),
    ("latency_p50_ms", "Latency p50", "ms"),
    ("latency_p95_ms", "Latency p95", "ms"),
    ("ttft_p95_ms", "Time to first token p95", "ms"),
    ("decode_tokens_per_s", "Decode", "tokens/s"),
    ("peak_memory_mb", "Peak memory", "MB"),
)
_UNITS = {name: unit for name, _, unit in SHOWN}
#: Figures the validator can measure on its host too (the others have no host figure).
_HOST_GATED = {m.name for m in FIELD_METRICS if m.host_gate}
_HOST_PREFIX = "host: "


def amount(value: float | None, unit: str) -> str:
    """``410 ms``, ``1.2 %`` (a rate in 0..1), ``2,048``; ``—`` for nothing measured."""
    if value is None:
        return "—"
    if unit == "%":
        return f"{100 * value:.1f} %"
    if unit == "":
        return f"{value:,.0f}"
    digits = 0 if abs(value) >= 100 else 1
    return f"{value:,.{digits}f} {unit}"


def span(since: Any, until: Any) -> str:
    """``2026-12-03 12:00:00 to 12:05:00 UTC``"""
    if not since or not until:
        return "no complete window yet"
    return f"{str(since)[:19].replace('T', ' ')} to {str(until)[11:19]} UTC"


@dataclass(frozen=True)
class Figure:
    name: str  # the FieldFigures attribute (``latency_p95_ms``)
    label: str
    value: str
    budget: str  # "≤ 250 ms", or "" without a budget
    host: str  # what the validator measured ("80 ms", "not measurable on the host"), or ""
    verdict: str  # pass | breach | unjudged | "" (a count: nothing to judge)

    @property
    def word(self) -> str:
        return {"pass": "✓ pass", "breach": "✗ breach", "unjudged": "? not judged"}.get(
            self.verdict, ""
        )


def _gate_key(name: str) -> str:
    return name.removeprefix("field.")


def host_from_gates(gates: list[dict[str, Any]]) -> dict[str, float | None]:
    """The host's figures the telemetry service wrote beside its gates (``host: 80``)."""
    found: dict[str, float | None] = {}
    for gate in gates:
        detail = str(gate.get("detail") or "")
        if detail.startswith(_HOST_PREFIX):
            try:
                found[_gate_key(gate["name"])] = float(detail.removeprefix(_HOST_PREFIX))
            except ValueError:  # "host: not measured"
                found[_gate_key(gate["name"])] = None
    return found


def host_from_report(variant: dict[str, Any] | None) -> dict[str, float | None]:
    """The host's figures of a lineage variant's latest validation report, per field figure
    (None: the report has the gate but could not measure it here)."""
    reports = (variant or {}).get("reports") or []
    if not reports:
        return {}
    gates = {g["name"]: g for g in reports[-1].get("gates") or []}
    found: dict[str, float | None] = {}
    for metric in FIELD_METRICS:
        gate = gates.get(metric.host_gate or "")
        if gate is not None:
            found[metric.name] = gate.get("value")
    return found


def figures(
    measured: dict[str, Any], gates: list[dict[str, Any]], host: dict[str, float | None]
) -> list[Figure]:
    """One row per shown figure: its value, the class's budget, the host's, and a verdict."""
    by_name = {_gate_key(g["name"]): g for g in gates}
    rows = []
    for name, label, unit in SHOWN:
        gate = by_name.get(name)
        budget, verdict = "", ""
        if gate is not None and gate.get("budget") is not None:
            sign = "≤" if gate.get("bound") == "max" else "≥"
            budget = f"{sign} {amount(gate['budget'], unit)}"
            passed = gate.get("passed")
            verdict = "unjudged" if passed is None else ("pass" if passed else "breach")
        shown_host = ""
        if name in host and name in _HOST_GATED:
            where = host[name]
            shown_host = "not measured on the host" if where is None else amount(where, unit)
        value = measured.get(name)
        if value is None and not budget:
            continue  # not a figure of this kind of model (TTFT of an encoder)
        rows.append(Figure(name, label, amount(value, unit), budget, shown_host, verdict))
    return rows


def breaches(rows: list[Figure]) -> int:
    return sum(1 for r in rows if r.verdict == "breach")


@dataclass(frozen=True)
class Drift:
    text: str
    verdict: str  # drifted | steady | unknown

    @property
    def word(self) -> str:
        return {"drifted": "✗ drifted", "steady": "✓ steady"}.get(self.verdict, "? unknown")


def drift(score: dict[str, Any] | None) -> Drift:
    if not score:
        return Drift("no validation baseline, or too few samples served yet", "unknown")
    moved = score["score"] > score["threshold"]
    kind = "embedding shift" if score["signal"] == "embedding" else "log-prob PSI"
    samples = f"{score['field_samples']:,} served / {score['baseline_samples']:,} baseline"
    text = f"{kind} {score['score']:.3f} vs threshold {score['threshold']:.3f} ({samples})"
    return Drift(text, "drifted" if moved else "steady")


def evidence_text(evidence: dict[str, Any]) -> str:
    """``arm64-pi5 latency_p95_ms 410 ms in the field > 250 ms budget; host measured 80 ms``"""
    metric = evidence["metric"]
    unit = _UNITS.get(metric, "")
    sign = ">" if evidence.get("bound") == "max" else "<"
    host = evidence.get("host_value")
    measured = ("not measured on the host" if host is None
                else f"host measured {amount(host, unit)}")  # fmt: skip
    return (f"{evidence['device_class']} {metric} {amount(evidence['field_value'], unit)} in "
            f"the field {sign} {amount(evidence['budget'], unit)} budget; {measured}")  # fmt: skip


@dataclass(frozen=True)
class Finding:
    detection_id: str
    kind: str  # regression | drift
    device_class: str
    variant_id: str
    what: str
    when: str  # first seen (the lineage) or the newest window's start (telemetry)
    labels: str
    windows: list[str]


def _window(window: dict[str, Any]) -> str:
    value = window.get("value")
    figure = f", {value:.4g}" if isinstance(value, int | float) else ""
    return (f"{str(window['start'])[11:19]} +{window['window_s']:.0f} s: "
            f"{window['gateways']} gateways, {window['requests']} requests{figure}")  # fmt: skip


def finding(found: dict[str, Any]) -> Finding:
    """A finding from the lineage (``kind``) or the telemetry service (``type``)."""
    kind = found.get("kind") or ("drift" if "drift" in str(found.get("type", "")) else "regression")
    if kind == "regression":
        what = evidence_text(found)
    else:
        what = drift(found).text if found.get("field_samples") is not None else (
            f"{found.get('signal')} shift {found.get('score', 0):.3f} > "
            f"{found.get('threshold', 0):.3f}"
        )  # fmt: skip
    windows = found.get("windows") or []
    when = str(found.get("time") or (windows[-1]["start"] if windows else ""))
    labels = ", ".join(f"{k}={v}" for k, v in sorted((found.get("labels") or {}).items()))
    return Finding(found["detection_id"], kind, found["device_class"], found["variant_id"], what,
                   when[:19].replace("T", " "), labels or "whole class",
                   [_window(w) for w in windows])  # fmt: skip


@dataclass(frozen=True)
class Recorded:
    """A variant's device-measured figures in one class as the lineage recorded them."""

    device_class: str
    variant_id: str
    recipe: str
    span: str
    figures: list[Figure]
    breaches: int
    measured_by: str


@dataclass(frozen=True)
class LineageField:
    recorded: list[Recorded]
    findings: list[Finding]

    def latency_by_variant(self) -> dict[str, Figure]:
        """Each measured variant's field latency p95 (beside the host's in the charts' tables)."""
        return {r.variant_id: f for r in self.recorded for f in r.figures
                if f.name == "latency_p95_ms"}  # fmt: skip


def of_lineage(lineage: dict[str, Any]) -> LineageField:
    """The lineage's ``field`` (each beside the host figures of the variant's own report) and
    its ``findings``, newest first."""
    variants = {v["variant_id"]: v for v in lineage.get("variants") or []}
    recorded = []
    for measured in lineage.get("field") or []:
        variant = variants.get(measured["variant_id"])
        gates = measured.get("gates") or []
        host = {**host_from_gates(gates), **host_from_report(variant)}
        rows = figures(measured["figures"], gates, host)
        shown_span = span(measured.get("since"), measured.get("until"))
        recipe = ((variant or {}).get("recipe") or {}).get("name") or measured["variant_id"]
        recorded.append(Recorded(measured["device_class"], measured["variant_id"], recipe,
                                 shown_span, rows, breaches(rows),
                                 measured.get("measured_by", "")))  # fmt: skip
    recorded.sort(key=lambda r: (r.device_class, r.recipe))
    found = [finding(f) for f in lineage.get("findings") or []]
    return LineageField(recorded, sorted(found, key=lambda f: f.when, reverse=True))


def lineage_only(lineage: dict[str, Any], known: list[dict[str, Any]]) -> list[str]:
    """Proposals the lineage records that the rollout service does not list (another
    deployment's, or not folded there yet), in words."""
    listed = {p["release_id"] for p in known}
    out = []
    for proposed in lineage.get("proposals") or []:
        if proposed["release_id"] in listed:
            continue
        new = proposed.get("variant_id") or "nothing"
        out.append(f"{proposed['release_id']} ({proposed['outcome']}): {proposed['device_class']} "
                   f"{proposed['replaces']} → {new}. {evidence_text(proposed['evidence'])}"
                   + (f". {proposed['reason']}" if proposed.get("reason") else ""))  # fmt: skip
    return out
