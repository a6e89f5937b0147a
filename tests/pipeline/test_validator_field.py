"""A re-optimization candidate judged against the field and proposed as a release for its class
(real NATS, moto S3, the registry and the validator in-process, ONNX Runtime in the probe)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from slmops.bus import Bus
from slmops.events import (
    OptimizationCompleted,
    OptimizationPlanned,
    ReleaseCreated,
    field_release_id,
    new_event,
    variant_id_for,
)
from slmops.events.payloads import ArtifactRef, FieldEvidence, PassSpec, PlannedJob, Recipe
from slmops.reports import ValidationReport
from slmops.testing.events import await_events
from slmops.testing.models import tiny_encoder_onnx, with_word_tokenizer
from slmops.testing.registry import register_variant

pytestmark = [pytest.mark.integration]


@pytest.fixture
def optimizer_overrides() -> dict[str, Any]:
    return {"profiles_dir": Path(__file__).parent / "profiles-validator"}


def _noted(data: bytes, note: str) -> bytes:
    """Other bytes (another variant), the same weights: it passes parity against the original."""
    import onnx

    proto = onnx.load_from_string(data)
    proto.metadata_props.add(key="slmops.note", value=note)
    return bytes(proto.SerializeToString())


async def test_a_candidate_judged_against_the_field_becomes_a_proposed_release(
    pipeline: Any, validator: Any, bus: Bus
) -> None:
    # setup: the variant the field measured (as released), and a candidate for its class
    data = with_word_tokenizer(tiny_encoder_onnx())
    regressed = await register_variant(pipeline.registry, data, device_class="test-cpu")
    parent = regressed.artifact
    uploaded = (await pipeline.registry.post("/v1/blobs", content=_noted(data, "fewer"))).json()
    recipe = Recipe(name="fewer-threads", passes=[PassSpec(name="convert")])
    candidate_id = variant_id_for(parent.digest, recipe, "test-cpu")
    stored = await pipeline.registry.post("/v1/variants", json={
        "model_name": "tiny", "version": "1.0.0", "variant_id": candidate_id,
        "device_class": "test-cpu", "recipe": recipe.model_dump(mode="json"),
        "artifact_digest": uploaded["digest"],
    })  # fmt: skip
    assert stored.status_code in (200, 201), stored.text
    artifact = ArtifactRef.model_validate(stored.json()["manifest"]["artifact"])
    evidence = FieldEvidence(
        detection_id="det-slow-arm",
        device_class="test-cpu",
        variant_id=regressed.variant_id,
        metric="latency_p95_ms",
        bound="max",
        budget=1000.0,
        field_value=100.0,
    )  # fmt: skip  (a budget no tiny model's ratio can miss: the arithmetic is what is checked)
    release_id = field_release_id("tiny", "1.0.0", evidence.detection_id)

    # execute: the optimizer's plan for the finding, then its one candidate completed
    common = {"model_name": "tiny", "version": "1.0.0", "parent_digest": parent.digest,
              "release_id": release_id, "field": evidence}  # fmt: skip
    plan = OptimizationPlanned(**common, jobs=[PlannedJob(
        variant_id=candidate_id, device_class="test-cpu", recipe_name=recipe.name)])  # fmt: skip
    signed = stored.json()["digest"]
    done = OptimizationCompleted(**common, variant_id=candidate_id, device_class="test-cpu",
                                 recipe=recipe, artifact=artifact, duration_s=1.0,
                                 manifest_digest=signed, reference=parent)  # fmt: skip
    await bus.publish(new_event(plan, source="/test"))
    await bus.publish(new_event(done, source="/test"))
    (proposed,) = await await_events(
        bus, "slmops.release.created.v1", count=1, timeout_s=120,
        where=lambda e: e.data.release_id == release_id,
    )  # fmt: skip

    # assert: the candidate's report has the field check, its prediction = field x host ratio
    response = await pipeline.registry.get(f"/v1/variants/{candidate_id}/report")
    report = ValidationReport.model_validate(response.json()["report"])
    assert report.verdict == "passed", report.reason
    (field,) = [c for c in report.checks if c.name == "field"]
    gate = report.gate("field.latency_p95_ms")
    assert gate is not None
    assert gate.value is not None
    ratio = field.evidence["host_ratio"]
    assert isinstance(ratio, float)
    assert ratio > 0
    assert gate.value == pytest.approx(100.0 * ratio, rel=1e-3)
    assert (gate.budget, gate.bound, gate.passed) == (1000.0, "max", True)
    # the detail prints the unrounded ratio to 3 places, the evidence keeps 4: compare as numbers
    shown = re.search(r"field 100 ms x host ratio (\d+\.\d{3}) = predicted", gate.detail)
    assert shown is not None, gate.detail
    assert float(shown[1]) == pytest.approx(ratio, abs=6e-4)
    assert field.evidence["regressed_variant"] == regressed.variant_id
    assert report.drift_baseline is not None
    assert report.drift_baseline.embedding is not None  # and the baseline, as every report

    # the proposal: only the finding's class, the candidate, the evidence carried along
    release: ReleaseCreated = proposed.data
    assert release.proposal == evidence
    assert [(e.device_class, e.variant_id) for e in release.entries] == [("test-cpu", candidate_id)]
    assert "predicted field latency_p95_ms" in release.entries[0].reason
    tally = (await validator.api.get(f"/v1/proposals/{release_id}")).json()
    assert (tally["released"], tally["outcome"]) == (True, "created")
    assert tally["proposal"]["detection_id"] == "det-slow-arm"
    assert (await validator.api.get("/v1/proposals/rel-field-nope")).status_code == 422
