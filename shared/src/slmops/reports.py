"""Validation reports: the validator's evidence about one variant for one device class.

The validator writes one as JSON (stored as a blob through the registry, its digest in the
``validation.*`` event); the CLI prints it and a gateway checks its verdict before it installs
a variant. Every judged figure is a :class:`GateResult` (measured value, budget, pass/fail), so
"why did it fail" is always "which gate, what value, against what budget".
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from slmops.events.payloads import ArtifactRef, GateResult
from slmops.telemetry.drift import DriftSignature

REPORT_SCHEMA = "slmops.validation.report.v1"


class CheckOutcome(BaseModel):
    """One check of the report: its gates, and the evidence behind them."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="The check, e.g. structure, runtime, parity, latency, size.")
    gates: list[GateResult] = Field(default_factory=list)
    evidence: dict[str, JsonValue] = Field(
        default_factory=dict, description="Figures that explain the gates (not judged)."
    )
    notes: list[str] = Field(default_factory=list, description="Caveats said in words.")
    duration_s: float = Field(0.0, ge=0)

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if g.passed is False]


class EvalSetInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="The model version's set (its digest) or the built-in one.")
    digest: str | None = None
    examples: int = Field(ge=0, description="Examples used (after the validator's cap).")
    labelled: int = Field(
        0, ge=0, description="Examples with a label (or topic, see label_source)."
    )
    label_source: Literal["label", "topic", ""] = Field(
        "", description="What the accuracy gate used: the labels, or the topics of the texts."
    )
    truncated: int = Field(0, ge=0, description="Texts cut to max_tokens.")
    max_tokens: int = Field(0, ge=0, description="Longest input fed, in tokens.")
    origin: Literal["eval-set", "built-in", "synthetic"] = "built-in"


class ValidationReport(BaseModel):
    """The whole account of one validation, and its verdict."""

    model_config = ConfigDict(extra="ignore")

    schema_: str = Field(REPORT_SCHEMA, alias="schema")
    model_name: str
    version: str
    variant_id: str
    device_class: str
    recipe_name: str
    verdict: Literal["passed", "failed"]
    reason: str = Field("", description="Every failed gate, measured value vs budget.")
    candidate: ArtifactRef
    reference: ArtifactRef | None = Field(
        None, description="The fp32 model the candidate is judged against."
    )
    eval_set: EvalSetInfo | None = None
    checks: list[CheckOutcome] = Field(default_factory=list)
    host: dict[str, JsonValue] = Field(
        default_factory=dict, description="CPU, ONNX Runtime version, threads: what measured."
    )
    started_at: datetime
    duration_s: float = Field(ge=0)
    markdown: str = Field(
        "", description="The same report rendered as Markdown, for readers without the CLI."
    )
    drift_baseline: DriftSignature | None = Field(
        None,
        description="The drift signature of the candidate on the evaluation set: what the "
        "field's served inputs are compared with (fleet.drift.detected).",
    )

    @property
    def gates(self) -> list[GateResult]:
        return [gate for check in self.checks for gate in check.gates]

    def gate(self, name: str) -> GateResult | None:
        """The gate called ``name`` (e.g. ``latency.p95_ms``), if the report has one."""
        return next((g for g in self.gates if g.name == name), None)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, indent=2).encode()


def failed_reason(gates: list[GateResult]) -> str:
    """``"parity.cosine_mean 0.912 < 0.980; size_mb 610 > 512"``: every failed gate in words."""
    return "; ".join(f"{g.name} {describe_value(g)}" for g in gates if g.passed is False)


def describe_value(gate: GateResult) -> str:
    if gate.value is None:
        return gate.detail or "not measured"
    value = _fmt(gate.value)
    if gate.budget is None:
        return f"{value}{_unit(gate)}" + (f" ({gate.detail})" if gate.detail else "")
    op = _comparison(gate)
    return f"{value}{_unit(gate)} {op} {_fmt(gate.budget)}{_unit(gate)}"


def _comparison(gate: GateResult) -> str:
    lower_bound = gate.bound == "min"
    if gate.passed is False:
        return "<" if lower_bound else ">"
    return ">=" if lower_bound else "<="


def _unit(gate: GateResult) -> str:
    return f" {gate.unit}" if gate.unit else ""


def _fmt(value: float) -> str:
    if value == 0 or 0.001 <= abs(value) < 100_000:
        return f"{value:.4g}" if abs(value) < 1 else f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{value:.3e}"


def render_markdown(report: ValidationReport) -> str:
    """A human-readable rendering: verdict first, then every check's gates and evidence."""
    mark = {True: "pass", False: "**FAIL**", None: "not judged here"}
    verdict = f"- Verdict: **{report.verdict.upper()}**"
    lines = [
        f"# Validation of `{report.variant_id}`",
        "",
        f"- Model: {report.model_name} {report.version}, recipe `{report.recipe_name}`",
        f"- Device class: `{report.device_class}`",
        verdict + (f": {report.reason}" if report.reason else ""),
        f"- Candidate: {report.candidate.digest} ({report.candidate.size_bytes / 1e6:.1f} MB)",
    ]
    if report.reference is not None:
        ref = report.reference
        lines.append(f"- Judged against: {ref.digest} ({ref.size_bytes / 1e6:.1f} MB, fp32)")
    if report.eval_set is not None:
        es = report.eval_set
        lines.append(
            f"- Evaluation set: {es.name} ({es.origin}), {es.examples} examples, "
            f"{es.labelled} labelled{f' (by {es.label_source})' if es.label_source else ''}, "
            f"{es.truncated} truncated to {es.max_tokens} tokens"
        )
    host = ", ".join(f"{k}={v}" for k, v in sorted(report.host.items()))
    lines += [f"- Measured on: {host}" if host else "- Measured on: unknown host", ""]
    for check in report.checks:
        lines += [f"## {check.name}", ""]
        if check.gates:
            lines += ["| gate | value | budget | result | detail |", "|---|---|---|---|---|"]
            for g in check.gates:
                value = "n/a" if g.value is None else f"{_fmt(g.value)}{_unit(g)}"
                result = "reported" if g.passed is None and g.value is not None else mark[g.passed]
                budget = "-" if g.budget is None else f"{_fmt(g.budget)}{_unit(g)}"
                lines.append(f"| {g.name} | {value} | {budget} | {result} | {g.detail} |")
            lines.append("")
        lines += [f"- {note}" for note in check.notes]
        if check.evidence:
            shown = ", ".join(f"{k}: {_show(v)}" for k, v in check.evidence.items())
            lines.append(f"- Evidence: {shown}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _show(value: JsonValue) -> str:
    if isinstance(value, float):
        return _fmt(value)
    return str(value)
