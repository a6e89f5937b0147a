"""The field loop's happy path on real parts (registry, optimizer, validator, rollout service in
process; NATS, S3, ONNX Runtime; simulated gateways): a version whose release chose the smaller
but slower variant for a class regresses there in the field; the optimizer plans the faster
recipe, the validator predicts it within the field budget and proposes it, the rollout service
holds it until an operator approves, and only that class's gateways get it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from slmops.auth import ROLES, BearerToken, LocalCredentials
from slmops.bus import Bus
from slmops.cohorts import CohortState, cohort_key, cohort_of
from slmops.events import (
    FleetRegressionDetected,
    derive_event_id,
    field_release_id,
    new_event,
)
from slmops.events.payloads import FieldWindow
from slmops.reports import ValidationReport
from slmops.testing.events import await_events
from slmops.testing.models import with_word_tokenizer
from slmops.testing.polling import until_answered
from slmops_gateway.simulator import FleetSpec
from slmops_rollout.engine import rollout_id_for

pytestmark = [pytest.mark.integration]

PROFILES = Path(__file__).parent / "profiles-field-loop"
SLOW, FAST = "int4-weight-only", "int8-dynamic"
#: field-cpu's max_latency_p95_ms: far above this host's figures (~20 ms for the slow variant,
#: more on a busy host), so both variants pass their host gates and the field alone breaks it
BUDGET_MS = 500.0
FIELD_MS = BUDGET_MS * 1.3  # what the field measured of the slow variant
#: Wide enough that the recipes' kernels, not per-call overhead or a busy host's hiccups, set
#: the time (the 4-bit recipe computes in fp32: ~1.7-2x dynamic INT8's time; profiles-field-loop)
HIDDEN = 1024
DETECTION = "det-field-loop-1"
OUTCOMES = "slmops.optimization.*.v1"


@pytest.fixture
def optimizer_overrides() -> dict[str, Any]:
    return {"profiles_dir": PROFILES}


@pytest.fixture
def validator_overrides() -> dict[str, Any]:
    """Enough timed runs that a p95 is not one scheduling hiccup (the loop ranks on them)."""
    return {"latency_runs": 100}


async def _report(pipeline: Any, variant_id: str) -> ValidationReport:
    response = await pipeline.registry.get(f"/v1/variants/{variant_id}/report")
    assert response.status_code == 200, response.text
    return ValidationReport.model_validate(response.json()["report"])


async def _host_figure(pipeline: Any, variant_id: str, gate_name: str) -> float:
    gate = (await _report(pipeline, variant_id)).gate(gate_name)
    assert gate is not None, f"{variant_id}: no {gate_name} in its report"
    assert gate.value, f"{variant_id}: no {gate_name} in its report"
    return gate.value


def _is_proposal(event: Any) -> bool:
    return getattr(event.data, "release_id", None) is not None


async def test_a_field_regression_ends_in_an_approved_rollout_to_that_class_only(
    pipeline: Any,
    validator: Any,
    bus: Bus,
    tiny_onnx: Callable[..., bytes],
    credentials: LocalCredentials,
) -> None:
    # setup: the version's own release; for field-cpu "smallest" chose the 4-bit variant
    await pipeline.publish(with_word_tokenizer(tiny_onnx(hidden=HIDDEN)), model_name="tiny",
                           format="onnx", task="feature-extraction")  # fmt: skip
    [own] = await await_events(bus, "slmops.release.created.v1", count=1, timeout_s=180)
    [planned] = await await_events(bus, "slmops.optimization.planned.v1", count=1)
    jobs = {(j.device_class, j.recipe_name): j.variant_id for j in planned.data.jobs}
    slow, fast = jobs[("field-cpu", SLOW)], jobs[("field-cpu", FAST)]
    other = jobs[("field-other", FAST)]
    chosen = {e.device_class: e.variant_id for e in own.data.entries}
    assert chosen == {"field-cpu": slow, "field-other": other}, own.data.entries
    built = await await_events(bus, "slmops.optimization.completed.v1", count=3)
    size = {e.data.variant_id: e.data.artifact.size_bytes for e in built}
    assert size[slow] < size[fast], size  # smaller: why "smallest" chose it
    # ... and slower on this host: the measured ratio the loop relies on, checked first
    # Each variant's p95 over the fp32 reference's, from runs interleaved in one job: what the
    # host was busy with slows both alike (the absolute p95s of two jobs, one timed while the
    # optimizer still built the third variant, once ranked the pair the wrong way round).
    slow_x = await _host_figure(pipeline, slow, "latency.p95_ratio")
    fast_x = await _host_figure(pipeline, fast, "latency.p95_ratio")
    if fast_x / slow_x >= 0.7:
        pytest.fail(f"the premise does not hold on this host: {FAST} at {fast_x:.2f}x the fp32 "
                    f"reference's p95, {SLOW} at {slow_x:.2f}x (ratio {fast_x / slow_x:.2f}, "
                    f"need < 0.7 for {FIELD_MS:g} ms x ratio to stay within {BUDGET_MS:g} "
                    "ms)")  # fmt: skip

    # setup: two gateways per class run the version's release
    spec = FleetSpec(count=4, classes={"field-cpu": 0.5, "field-other": 0.5}, prefix="fl")
    classes = {gateway_id: device_class for gateway_id, device_class, *_ in spec.layout()}
    assert sorted(classes.values()) == ["field-cpu"] * 2 + ["field-other"] * 2
    credentials.mint("ops", "user:ops", ROLES["operator"])
    operator = BearerToken(credentials.token("ops"))
    async with pipeline.rollout_service() as api, pipeline.simulated_fleet(bus, spec) as fleet:
        await pipeline.await_fleet(api, 4)
        at_once = {"percents": [100], "soak_s": 0}  # one wave, no soak: not what is tested
        body = {"model_name": "tiny", "version": "1.0.0", "policy": at_once}
        first = await api.post("/v1/rollouts", json=body)
        assert first.status_code == 201, first.text
        first_id = first.json()["rollout_id"]
        await await_events(bus, "slmops.rollout.completed.v1", count=1, timeout_s=60)

        async def serving(expected: dict[str, int]) -> bool:
            return fleet.serving() == expected

        await until_answered(lambda: serving({slow: 2, other: 2}), "the version on the fleet")

        # execute: the telemetry service's finding (as it would publish it)
        finding = FleetRegressionDetected(
            detection_id=DETECTION, model_name="tiny", version="1.0.0", variant_id=slow,
            device_class="field-cpu",
            windows=[FieldWindow(start=datetime.now(UTC), window_s=30, gateways=2,
                                 requests=60, value=FIELD_MS)],
            metric="latency_p95_ms", bound="max", budget=BUDGET_MS, field_value=FIELD_MS,
            host_value=await _host_figure(pipeline, slow, "latency.p95_ms"),
        )  # fmt: skip
        evidence = finding.evidence()
        await bus.publish(new_event(finding, source="/slmops/telemetry"))

        # assert: the plan for the class names the faster recipe (built already: reused)
        release_id = field_release_id("tiny", "1.0.0", DETECTION)
        try:
            plan, outcome = await await_events(bus, OUTCOMES, count=2, where=_is_proposal,
                                               timeout_s=120)  # fmt: skip
        except TimeoutError as exc:  # what the optimizer made of it (CI once timed out here)
            jobs = await pipeline.optimizer.get("/v1/jobs")
            raise AssertionError(f"{exc}; the optimizer's jobs: {jobs.text}") from None
        assert plan.type == "slmops.optimization.planned.v1"
        assert (plan.data.release_id, plan.data.field) == (release_id, evidence)
        assert [(j.device_class, j.recipe_name, j.variant_id) for j in plan.data.jobs] == [
            ("field-cpu", FAST, fast)]  # fmt: skip
        assert outcome.type == "slmops.optimization.completed.v1", outcome.data
        assert (outcome.data.variant_id, outcome.data.release_id) == (fast, release_id)
        assert outcome.data.field == evidence
        assert outcome.id == derive_event_id("optimization.outcome", release_id, fast)

        # the validator: the faster variant predicted within the field budget, proposed
        [proposed] = await await_events(
            bus, "slmops.release.created.v1", count=1, timeout_s=120,
            where=lambda e: e.data.release_id == release_id,
        )  # fmt: skip
        assert proposed.id == derive_event_id("release", release_id)
        assert proposed.data.proposal == evidence
        assert [(e.device_class, e.variant_id) for e in proposed.data.entries] == [
            ("field-cpu", fast)]  # fmt: skip
        report = await _report(pipeline, fast)
        (field,) = [c for c in report.checks if c.name == "field"]
        gate = report.gate("field.latency_p95_ms")
        assert gate is not None
        assert gate.value is not None
        ratio = field.evidence["host_ratio"]
        assert isinstance(ratio, float)
        assert gate.value == pytest.approx(FIELD_MS * ratio, rel=1e-3)
        assert (gate.budget, gate.bound, gate.passed) == (BUDGET_MS, "max", True)
        assert field.evidence["regressed_variant"] == slow
        assert field.evidence["detection_id"] == DETECTION

        # the rollout service holds it until an operator approves, through its API
        async def pending() -> bool:
            held = await api.get(f"/v1/proposals/{release_id}")
            return held.status_code == 200 and held.json()["status"] == "pending"

        await until_answered(pending, "the proposal held as pending")
        held = (await api.get(f"/v1/proposals/{release_id}")).json()
        assert (held["proposed_variant_id"], held["evidence"]) == (
            fast, evidence.model_dump(mode="json"))  # fmt: skip
        listed = (await api.get("/v1/rollouts")).json()
        assert [r["rollout_id"] for r in listed] == [first_id]  # nothing rolled out on its own
        approved = await api.post(f"/v1/proposals/{release_id}/approve",
                                  json={"reason": "field p95 over budget", "policy": at_once},
                                  auth=operator)  # fmt: skip
        assert approved.status_code == 200, approved.text
        decision = approved.json()
        rollout_id = rollout_id_for(release_id, {})
        assert (decision["proposal"]["status"], decision["proposal"]["decided_by"]) == (
            "approved", "user:ops")  # fmt: skip
        assert decision["proposal"]["rollout_id"] == decision["rollout"]["rollout_id"] == rollout_id
        await await_events(bus, "slmops.rollout.completed.v1", count=1, timeout_s=60,
                           where=lambda e: e.data.rollout_id == rollout_id)  # fmt: skip
        [started] = await await_events(bus, "slmops.rollout.started.v1", count=1,
                                       where=lambda e: e.data.rollout_id == rollout_id)  # fmt: skip
        await until_answered(lambda: serving({fast: 2, other: 2}), "the new variant installed")

        # only field-cpu's gateways were assigned the new variant; field-other's kept theirs:
        # what each gateway's cohort state says for it (the gateways speak the cohort protocol)
        cohorts = await bus.key_value("slmops-cohorts")
        assigned = {}
        for gateway_id, device_class in classes.items():
            raw = await cohorts.get(cohort_key(cohort_of(gateway_id)))
            state = CohortState.model_validate_json(raw.value or b"{}")
            chosen = state.choose(device_class, {}, "tiny", None)
            assert chosen is not None, gateway_id
            assigned[gateway_id] = (chosen.rollout_id, chosen.desired.variant_id)
    assert assigned == {
        g: (rollout_id, fast) if c == "field-cpu" else (first_id, other) for g, c in classes.items()
    }

    # one trace from the finding to the new rollout (traceparent: version-trace id-span-flags)
    [sent] = await await_events(bus, "slmops.fleet.regression.detected.v1.>", count=1)
    trace = sent.traceparent.split("-")[1]
    assert [e.traceparent.split("-")[1] for e in (plan, outcome, proposed, started)] == [trace] * 4

    # the lineage: the finding, the proposal naming the variant it replaces, its rollout
    async def in_lineage() -> bool:
        found = (await pipeline.registry.get("/v1/models/tiny/1.0.0/lineage")).json()
        rolled = any(r["rollout_id"] == rollout_id for r in found["rollouts"])
        return bool(found["findings"]) and bool(found["proposals"]) and rolled

    await until_answered(in_lineage, "the finding, the proposal and its rollout in the lineage")
    lineage = (await pipeline.registry.get("/v1/models/tiny/1.0.0/lineage")).json()
    [found] = lineage["findings"]
    assert (found["detection_id"], found["kind"], found["variant_id"], found["field_value"]) == (
        DETECTION, "regression", slow, FIELD_MS)  # fmt: skip
    [proposal] = lineage["proposals"]
    assert (proposal["release_id"], proposal["replaces"], proposal["variant_id"]) == (
        release_id, slow, fast)  # fmt: skip
    assert proposal["outcome"] == "proposed"
    assert proposal["evidence"] == evidence.model_dump(mode="json")
    rollouts = {r["rollout_id"]: r["release_id"] for r in lineage["rollouts"]}
    assert rollouts[rollout_id] == release_id
