"""Validation reports: every failed gate said with value vs budget, and a readable rendering."""

from __future__ import annotations

from datetime import UTC, datetime

from slmops.events.payloads import ArtifactRef, GateResult
from slmops.reports import CheckOutcome, ValidationReport, failed_reason, render_markdown

ART = ArtifactRef(digest="sha256:" + "a" * 64, size_bytes=23_400_000, uri="s3://b/blobs/x")


def _report(gates: list[GateResult]) -> ValidationReport:
    failed = [g for g in gates if g.passed is False]
    return ValidationReport(
        model_name="minilm", version="1.0.0", variant_id="v-1", device_class="x86",
        recipe_name="int8", verdict="failed" if failed else "passed",
        reason=failed_reason(failed), candidate=ART,
        checks=[CheckOutcome(name="parity", gates=gates, notes=["2 texts truncated"])],
        started_at=datetime.now(UTC), duration_s=1.5,
    )  # fmt: skip


def test_failed_gates_read_as_value_against_budget_in_the_gates_direction() -> None:
    gates = [
        GateResult(name="parity.cosine_mean", value=0.9123, budget=0.98, bound="min",
                   passed=False),
        GateResult(name="size.size_mb", value=610.0, budget=512.0, unit="MB", bound="max",
                   passed=False),
        GateResult(name="runtime.load", value=1.0, passed=False, detail="NOT_IMPLEMENTED: Foo"),
        GateResult(name="latency.p95_ms", value=3.0, budget=30.0, bound="max", passed=True),
    ]  # fmt: skip
    assert failed_reason(gates) == (
        "parity.cosine_mean 0.9123 < 0.98; size.size_mb 610 MB > 512 MB; "
        "runtime.load 1 (NOT_IMPLEMENTED: Foo)"
    )


def test_markdown_shows_verdict_gates_and_what_was_not_judged() -> None:
    report = _report([
        GateResult(name="parity.cosine_mean", value=0.9123, budget=0.98, bound="min",
                   passed=False),
        GateResult(name="parity.cosine_min", value=0.8, bound="min"),
        GateResult(name="latency.p95_ms", unit="ms", detail="not measurable on this host"),
    ])  # fmt: skip
    text = render_markdown(report)
    assert "- Verdict: **FAILED**: parity.cosine_mean 0.9123 < 0.98" in text
    assert "| parity.cosine_mean | 0.9123 | 0.98 | **FAIL** |" in text
    assert "| parity.cosine_min | 0.8 | - | reported |" in text
    assert "| latency.p95_ms | n/a | - | not judged here | not measurable on this host |" in text
    assert "- 2 texts truncated" in text
    assert ValidationReport.model_validate_json(report.to_json()) == report
