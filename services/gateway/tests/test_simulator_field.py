"""The fleet simulator's field: health from what the validator measured on its host, a class
slower in the field, a class served shifted inputs - the simulated devices without NATS."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from slmops.events import GatewayReport
from slmops.events.payloads import (
    ArtifactRef,
    DesiredModel,
    GateResult,
    HealthAggregate,
    PassSpec,
    Recipe,
)
from slmops.events.reports import report_event
from slmops.fleetsim import FleetRequest
from slmops.manifests import Manifest
from slmops.reports import CheckOutcome, ValidationReport
from slmops.settings import PlatformSettings
from slmops.telemetry import (
    DriftSignature,
    Sketch,
    embedding_moments,
    embedding_shift,
    logprob_shift,
    merge_signatures,
    token_logprobs,
)
from slmops_gateway.fleetsim import simulated_fleet
from slmops_gateway.settings import GatewaySettings
from slmops_gateway.simfield import BASE_LATENCY_MS, P95_OVER_P50, REQUESTS_PER_ROUND
from slmops_gateway.simulator import FleetSpec, SimulatedFleet
from slmops_gateway.slots import SessionOptions
from slmops_gateway.verify import Vouched

ARTIFACT = ArtifactRef(digest="sha256:" + "ab" * 32, size_bytes=50 * 2**20, uri="s3://b/a")


class Reports:
    """The registry as the simulator reads it: the newest validation report of a variant."""

    def __init__(self, reports: dict[str, ValidationReport]) -> None:
        self.reports, self.asked = reports, 0

    async def variant_report(self, variant_id: str) -> dict[str, Any] | None:
        self.asked += 1
        report = self.reports.get(variant_id)
        return None if report is None else {"manifest": {}, "report": report.model_dump(
            mode="json", by_alias=True)}  # fmt: skip


def _report(variant_id: str, gates: dict[str, float | None], baseline: DriftSignature | None
            ) -> ValidationReport:  # fmt: skip
    checks = [CheckOutcome(name="measured", gates=[GateResult(name=n, value=v)
                                                   for n, v in gates.items()])]  # fmt: skip
    return ValidationReport(
        model_name="m", version="1.0.0", variant_id=variant_id, device_class="x86-avx512-vnni",
        recipe_name="int8", verdict="passed", candidate=ARTIFACT, started_at=datetime.now(UTC),
        duration_s=1.0, checks=checks, drift_baseline=baseline,
    )  # fmt: skip


def _manifest(version: str, task: str) -> Manifest:
    return Manifest(kind="variant", model_name="m", version=version, format="onnx", task=task,
                    artifact=ARTIFACT, parent_digest="sha256:" + "01" * 32, device_class="x",
                    recipe=Recipe(name="int8", passes=[PassSpec(name="convert")]),
                    created_by="test")  # fmt: skip


async def _fleet(
    tmp_path: Path, spec: FleetSpec, reports: Reports, variant_id: str, task: str
) -> SimulatedFleet:
    """``spec``'s gateways, each with ``variant_id`` installed by its simulated device."""
    base = GatewaySettings(platform=PlatformSettings(var_dir=tmp_path / "var"))
    fleet = SimulatedFleet(cast(Any, None), cast(Any, reports), spec, base)
    desired = DesiredModel(model_name="m", version="1.0.0", variant_id=variant_id,
                           manifest_digest="sha256:" + "cd" * 32, artifact=ARTIFACT)  # fmt: skip
    manifest = _manifest("1.0.0", task)
    vouched = Vouched(manifest, desired.manifest_digest, "sha256:" + "ef" * 32)
    for sim in fleet.gateways.values():
        sim.agent.slots.swap_in(await sim.install(desired, vouched, SessionOptions()))
    return fleet


def _round(fleet: SimulatedFleet, device_class: str) -> list[HealthAggregate]:
    return [sim.health(30.0) for sim in fleet.gateways.values()
            if sim.agent.settings.device_class == device_class]  # fmt: skip


def _encoder_baseline() -> DriftSignature:
    rng = np.random.default_rng(3)
    centre = rng.normal(0, 0.05, 64)
    return DriftSignature(embedding=embedding_moments(centre + rng.normal(0, 0.05, (400, 64))))


async def test_a_slow_class_reports_proportionally_slower_and_a_shifted_one_drifts(
    tmp_path: Path,
) -> None:
    # setup: 40 encoders on two classes; the host measured a p95 of 14 ms and a baseline;
    # the field makes "slow" 3x slower and serves "shifted" inputs 1.5 SDs away
    baseline = _encoder_baseline()
    reports = Reports({"v-enc": _report("v-enc", {"latency.p95_ms": 14.0}, baseline)})
    spec = FleetSpec(count=40, classes={"slow": 0.5, "shifted": 0.5},
                     field_slowdown={"slow": 3.0}, input_shift={"shifted": 1.5})  # fmt: skip
    fleet = await _fleet(tmp_path, spec, reports, "v-enc", "feature-extraction")

    # execute: two health rounds
    rounds = {c: _round(fleet, c) + _round(fleet, c) for c in ("slow", "shifted")}

    # assert: histograms count every request; the field p95 is the host's times the slowdown
    assert reports.asked == 2  # one profile per (variant, class), not one per gateway
    p95 = {}
    for device_class, healths in rounds.items():
        assert all(h.latency_ms is not None for h in healths)
        assert all(h.latency_ms.count == h.request_count == REQUESTS_PER_ROUND  # type: ignore[union-attr]
                   for h in healths)  # fmt: skip
        merged = Sketch.of(*(h.latency_ms for h in healths))
        assert merged.count == 40 * REQUESTS_PER_ROUND
        p95[device_class] = merged.quantile(0.95)
        for h in healths:
            assert h.latency_p95_ms == pytest.approx(h.latency_p50_ms * P95_OVER_P50)
            assert h.ttft_ms is None
            assert h.decode_tokens == 0
            assert h.peak_memory_mb == pytest.approx(64 + 1.3 * 50)
    assert p95["shifted"] == pytest.approx(14.0, rel=0.15)
    assert p95["slow"] / p95["shifted"] == pytest.approx(3.0, rel=0.1)
    assert baseline.embedding is not None
    for device_class, low, high in (("slow", 0.0, 0.3), ("shifted", 1.0, 2.0)):
        served = merge_signatures(h.drift for h in rounds[device_class])
        assert served is not None
        assert served.embedding is not None
        assert served.embedding.count == 2 * 20 * REQUESTS_PER_ROUND  # two rounds
        assert low <= embedding_shift(baseline.embedding, served.embedding) < high


async def test_a_decoder_class_has_slower_ttft_slower_decoding_and_less_likely_tokens(
    tmp_path: Path,
) -> None:
    # setup: the host measured a 50 ms median TTFT and 100 tokens/s; its logprob baseline
    rng = np.random.default_rng(5)
    baseline = DriftSignature(logprobs=token_logprobs(-rng.exponential(1.2, 5000)))
    gates = {"generation.ttft_ms": 50.0, "generation.decode_tokens_per_s": 100.0}
    reports = Reports({"v-dec": _report("v-dec", gates, baseline)})
    spec = FleetSpec(count=30, classes={"pi": 1, "x86": 2}, field_slowdown={"pi": 2.0},
                     input_shift={"pi": 1.0})  # fmt: skip
    fleet = await _fleet(tmp_path, spec, reports, "v-dec", "text-generation")

    # execute
    rounds = {c: _round(fleet, c) for c in ("pi", "x86")}

    # assert: TTFT around the host's median times the slowdown; decoding slower the same way
    ttft, speed, psi = {}, {}, {}
    for device_class, healths in rounds.items():
        merged = Sketch.of(*(h.ttft_ms for h in healths))
        assert merged.count == len(healths) * REQUESTS_PER_ROUND
        ttft[device_class] = merged.quantile(0.5)
        tokens, seconds = sum(h.decode_tokens for h in healths), sum(h.decode_s for h in healths)
        speed[device_class] = tokens / seconds
        for h in healths:
            assert h.decode_tokens_per_s == pytest.approx(h.decode_tokens / h.decode_s)
            assert h.latency_ms is not None
            assert h.ttft_ms is not None
            assert h.latency_ms.count == h.ttft_ms.count == h.request_count
            assert h.latency_ms.quantile(0.5) > h.ttft_ms.quantile(0.5)  # decoding comes after
        served = merge_signatures(h.drift for h in healths)
        assert served is not None
        assert served.logprobs is not None
        assert baseline.logprobs
        assert served.logprobs.count == sum(h.decode_tokens + h.request_count for h in healths)
        psi[device_class] = logprob_shift(baseline.logprobs, served.logprobs)
    assert ttft["x86"] == pytest.approx(50.0, rel=0.15)
    assert ttft["pi"] / ttft["x86"] == pytest.approx(2.0, rel=0.1)
    assert speed["x86"] == pytest.approx(100.0, rel=0.15)
    assert speed["pi"] / speed["x86"] == pytest.approx(0.5, rel=0.1)
    assert psi["x86"] < 0.1 < 0.25 < psi["pi"]


async def test_without_measurements_the_defaults_and_a_synthetic_baseline_and_faults_hold(
    tmp_path: Path,
) -> None:
    # setup: a report without latency or baseline; a tenth of the fleet gets the latency fault
    reports = Reports({"v-1": _report("v-1", {"latency.p95_ms": None}, None)})
    spec = FleetSpec(count=20, classes={"a": 0.5, "b": 0.5}, input_shift={"b": 2.0},
                     faults={"latency": 0.1})  # fmt: skip
    fleet = await _fleet(tmp_path, spec, reports, "v-1", "feature-extraction")

    # execute: two rounds on the first model, then the faulty ones get another model
    first = {gid: sim.health(30.0) for gid, sim in fleet.gateways.items()}
    second = {gid: sim.health(30.0) for gid, sim in fleet.gateways.items()}
    reports.reports["v-2"] = _report("v-2", {}, None)
    faulty = [gid for gid, sim in fleet.gateways.items() if sim.fault == "latency"]
    desired = DesiredModel(model_name="m", version="1.1.0", variant_id="v-2",
                           manifest_digest="sha256:" + "cd" * 32, artifact=ARTIFACT)  # fmt: skip
    manifest = _manifest("1.1.0", "feature-extraction")
    vouched = Vouched(manifest, desired.manifest_digest, "sha256:" + "ef" * 32)
    for gid in faulty:
        sim = fleet.gateways[gid]
        sim.agent.slots.swap_in(await sim.install(desired, vouched, SessionOptions()))
    later = {gid: fleet.gateways[gid].health(30.0) for gid in faulty}

    # assert: 20 ms around the fleet, the fault 10x on the later model only, in histograms too
    for health in first.values():
        assert health.latency_p50_ms is not None
        assert 0.9 * BASE_LATENCY_MS <= health.latency_p50_ms <= 1.1 * BASE_LATENCY_MS
    assert len(faulty) == 2
    for gid in faulty:
        before, after = first[gid], later[gid]
        assert before.latency_p95_ms is not None
        assert after.latency_p95_ms == pytest.approx(10 * before.latency_p95_ms)
        assert after.latency_ms is not None
        assert Sketch.of(after.latency_ms).mean() == pytest.approx(
            10 * BASE_LATENCY_MS * fleet.gateways[gid].jitter, rel=0.15
        )

    # the synthetic inputs of one round against another's: only the shifted class moved
    def of_class(healths: dict[str, HealthAggregate], device_class: str) -> Any:
        merged = merge_signatures(h.drift for gid, h in healths.items()
                                  if fleet.gateways[gid].agent.settings.device_class
                                  == device_class)  # fmt: skip
        assert merged is not None
        assert merged.embedding is not None
        return merged.embedding

    synthetic = of_class(first, "a")
    assert embedding_shift(synthetic, of_class(second, "a")) < 0.3
    assert embedding_shift(synthetic, of_class(first, "b")) > 1.0


def test_the_spec_refuses_strange_classes_and_factors() -> None:
    spec = FleetSpec(count=1, classes={"x": 1.0}, field_slowdown={"x": 1000.0})
    assert spec.field_slowdown == {"x": 1000.0}
    with pytest.raises(ValueError, match="names classes not in the fleet"):
        FleetSpec(count=1, classes={"x": 1.0}, input_shift={"y": 1.0})
    with pytest.raises(ValueError, match="positive factors"):
        FleetSpec(count=1, classes={"x": 1.0}, field_slowdown={"x": 0.0})
    with pytest.raises(ValueError, match="at least 0"):
        FleetSpec(count=1, classes={"x": 1.0}, input_shift={"x": -1.0})


async def test_reports_of_a_simulated_round_stay_small_and_carry_the_model(
    tmp_path: Path,
) -> None:
    reports = Reports({"v-dec": _report("v-dec", {"generation.ttft_ms": 80.0}, None)})
    spec = FleetSpec(count=2, classes={"x": 1.0}, field_slowdown={"x": 50.0})
    fleet = await _fleet(tmp_path, spec, reports, "v-dec", "text-generation")
    for sim in fleet.gateways.values():
        report: GatewayReport = sim.agent.report("health", variant_id="v-dec",
                                                 health=sim.health(30.0))  # fmt: skip
        assert (report.model_name, report.version) == ("m", "1.0.0")
        assert len(report_event(report).to_json()) < 16 * 1024


def test_the_sdk_request_reaches_the_simulator(tmp_path: Path) -> None:
    request = FleetRequest(count=4, classes={"arm64-pi5": 0.5, "x86": 0.5},
                           field_slowdown={"arm64-pi5": 3.0}, input_shift={"x86": 1.5})  # fmt: skip
    running = simulated_fleet(cast(Any, None), request,
                              PlatformSettings(var_dir=tmp_path / "var"))  # fmt: skip
    assert running.fleet.spec.field_slowdown == {"arm64-pi5": 3.0}
    assert running.fleet.spec.input_shift == {"x86": 1.5}
    with pytest.raises(ValueError, match="field slowdown names classes not in the fleet"):
        simulated_fleet(cast(Any, None), FleetRequest(count=1, field_slowdown={"nope": 2.0}),
                        PlatformSettings(var_dir=tmp_path / "var"))  # fmt: skip


async def test_a_candidate_judged_against_the_field_runs_as_the_validator_predicted(
    tmp_path: Path,
) -> None:
    # setup: a class 10x slower in the field; one variant measured 14 ms on the host, a
    # re-optimization's candidate that the validator predicted at 90 ms p95 in the field
    reports = Reports({
        "v-old": _report("v-old", {"latency.p95_ms": 14.0}, None),
        "v-new": _report("v-new", {"latency.p95_ms": 6.0, "field.latency_p95_ms": 90.0}, None),
    })  # fmt: skip
    spec = FleetSpec(count=20, classes={"slow": 1.0}, field_slowdown={"slow": 10.0})
    old = await _fleet(tmp_path / "old", spec, reports, "v-old", "feature-extraction")
    new = await _fleet(tmp_path / "new", spec, reports, "v-new", "feature-extraction")

    # execute: a round of each
    p95_old = Sketch.of(*(h.latency_ms for h in _round(old, "slow"))).quantile(0.95)
    p95_new = Sketch.of(*(h.latency_ms for h in _round(new, "slow"))).quantile(0.95)

    # assert: the host figure times the slowdown; the prediction as it is (slowdown inside)
    assert p95_old == pytest.approx(140.0, rel=0.15)
    assert p95_new == pytest.approx(90.0, rel=0.15)
