"""The handlers: a finding is published once however often it is found; reports decode by
their own model; expectations come from the variant's report, asked for once."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from slmops.events import EventDecodeError
from slmops.events.payloads import ArtifactRef, FleetRegressionDetected, GateResult
from slmops.profiles import load_profiles
from slmops.reports import CheckOutcome, ValidationReport
from slmops.service.registry_api import RegistryClient
from slmops.telemetry import DriftSignature, token_logprobs
from slmops.testing.factories import model_published, sample_digest
from slmops_telemetry.detect import DetectionSettings
from slmops_telemetry.expectations import Expectations, expectations_for
from slmops_telemetry.handlers import decode_report, detect_once, on_reports
from slmops_telemetry.view import FleetView

PROFILES = load_profiles(Path(__file__).parents[3] / "deploy" / "profiles")


class StubRegistry(RegistryClient):
    def __init__(self, body: dict[str, Any] | None) -> None:
        super().__init__("http://127.0.0.1:9")
        self.body, self.calls = body, 0

    async def variant_report(self, variant_id: str) -> dict[str, Any] | None:
        self.calls += 1
        return self.body


def report_body(variant_id: str) -> dict[str, Any]:
    report = ValidationReport(
        model_name="m", version="1.0.0", variant_id=variant_id, device_class="arm64-pi5",
        recipe_name="int8", verdict="passed",
        candidate=ArtifactRef(digest=sample_digest("c"), size_bytes=1, uri="s3://b/c"),
        checks=[CheckOutcome(name="generation", gates=[
            GateResult(name="generation.ttft_ms", value=410.0, budget=1500.0, bound="max"),
        ])],
        started_at=datetime(2026, 12, 3, tzinfo=UTC), duration_s=1.0,
        drift_baseline=DriftSignature(logprobs=token_logprobs([-0.5] * 100)),
    )  # fmt: skip
    return {"manifest": {"digest": sample_digest("report")},
            "report": report.model_dump(mode="json", by_alias=True)}  # fmt: skip


async def test_a_finding_is_published_once_however_often_it_is_found(maker) -> None:
    view = FleetView()
    for window in range(4):
        on_reports(maker.window(window, latency_ms=400.0), view)
    expected = Expectations("v-a", "arm64-pi5", PROFILES["arm64-pi5"].budgets)
    asked: list[tuple[str, str]] = []

    async def source(variant_id: str, device_class: str) -> Expectations | None:
        asked.append((variant_id, device_class))
        return expected

    published: list[Any] = []

    async def publish(finding: Any) -> None:
        published.append(finding)

    seen: set[str] = set()
    first = await detect_once(view, source, DetectionSettings(), publish, seen, maker.at(4, 5))
    again = await detect_once(view, source, DetectionSettings(), publish, seen, maker.at(4, 9))

    assert [type(f) for f in first] == [FleetRegressionDetected]
    assert first[0].metric == "latency_p95_ms"
    assert again == []
    assert published == first
    assert seen == {first[0].detection_id}
    assert asked == [("v-a", "arm64-pi5")] * 2
    restarted: set[str] = set(seen)  # as restored from KV: still not published again
    mapping = {("v-a", "arm64-pi5"): expected}
    assert await detect_once(view, mapping, DetectionSettings(), publish, restarted) == []


def test_reports_decode_by_their_model_and_anything_else_as_the_bus_does(maker) -> None:
    event = maker.report("gw-1", maker.at(0), maker.samples())
    other = model_published()

    assert decode_report(event.to_json()) == event
    assert decode_report(other.to_json()).id == other.id
    with pytest.raises(EventDecodeError, match="not JSON"):
        decode_report(b"\xff{")


async def test_expectations_come_from_the_report_once_per_variant() -> None:
    registry = StubRegistry(report_body("v-exp-1"))
    first = await expectations_for(registry, PROFILES, "v-exp-1", "arm64-pi5")
    second = await expectations_for(registry, PROFILES, "v-exp-1", "arm64-pi5")

    assert first == second
    assert first is not None
    assert registry.calls == 1
    assert first.budgets == PROFILES["arm64-pi5"].budgets
    assert first.host_value("ttft_p95_ms") == 410.0
    assert first.host_value("latency_p95_ms") is None
    assert first.report_digest == sample_digest("report")
    assert first.drift_baseline is not None
    assert await expectations_for(registry, PROFILES, "v-exp-1", "no-such-class") is None


async def test_a_variant_without_a_report_is_judged_on_budgets_and_asked_again() -> None:
    registry = StubRegistry(None)
    found = await expectations_for(registry, PROFILES, "v-exp-2", "jetson-orin-gpu")
    await expectations_for(registry, PROFILES, "v-exp-2", "jetson-orin-gpu")

    assert found is not None
    assert found.budgets.max_latency_p95_ms == 50.0
    assert found.drift_baseline is None
    assert registry.calls == 2
