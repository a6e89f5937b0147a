"""The optimizer's side of the field loop on real parts (registry, NATS, S3, ONNX Runtime, Serve
in local testing mode): a published tiny encoder's variant regresses in the field, and the
optimizer plans a proposal for that class whose candidates are announced with the proposal's
release id and the field evidence, in the finding's trace."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from slmops.bus import Bus
from slmops.events import (
    FleetRegressionDetected,
    derive_event_id,
    field_release_id,
    new_event,
)
from slmops.events.payloads import FieldWindow
from slmops.testing.events import await_events
from slmops.testing.polling import until_answered

pytestmark = [pytest.mark.integration]

PROFILE = """\
name: field-cpu
description: A host-like class with an 8-bit weight-only recipe and no 4-bit one
cpu: {arch: x86_64, isa_features: [avx2]}
execution_providers: [CPUExecutionProvider]
latency_measurable_on_host: true
ram_mb: 4096
storage_mb: 8192
precisions: [fp32, int8, int4]
opset_min: 13
opset_max: 21
budgets: {max_size_mb: 512, max_peak_memory_mb: 2048, max_latency_p95_ms: 5}
quality: {min_cosine: 0.9}
search: {max_tries: 1, sample_size: 8}
recipes:
  - name: int8-dynamic
    passes:
      - {name: convert}
      - {name: int8_dynamic, config: {per_channel: true}}
  - name: int8-weight-only
    passes:
      - {name: convert}
      - {name: weight_only, config: {bits: 8, block_size: 32, symmetric: true}}
"""
OUTCOMES = "slmops.optimization.*.v1"


@pytest.fixture
def optimizer_overrides(tmp_path: Path) -> dict[str, Any]:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "field-cpu.yaml").write_text(PROFILE)
    return {"profiles_dir": profiles}


def _is_proposal(event: Any) -> bool:
    return getattr(event.data, "release_id", None) is not None


async def test_a_field_regression_becomes_a_proposal_whose_candidates_carry_the_evidence(
    pipeline: Any, validator: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: the version's own release: both recipes built for the class
    await pipeline.publish(tiny_onnx(), model_name="tiny", format="onnx", task="feature-extraction")
    own = await await_events(bus, OUTCOMES, count=3, timeout_s=120)
    jobs = {j.recipe_name: j.variant_id for j in own[0].data.jobs}
    assert sorted(jobs) == ["int8-dynamic", "int8-weight-only"]
    assert [e.type for e in own[1:]] == ["slmops.optimization.completed.v1"] * 2
    finding = FleetRegressionDetected(
        detection_id="det-tiny-1", model_name="tiny", version="1.0.0",
        variant_id=jobs["int8-dynamic"], device_class="field-cpu",
        windows=[FieldWindow(start=datetime.now(UTC), window_s=30, gateways=3, requests=90,
                             value=8.0)],
        metric="latency_p95_ms", bound="max", budget=5.0, field_value=8.0,
    )  # fmt: skip
    sent = new_event(finding, source="/slmops/telemetry")

    # execute: the telemetry service's finding
    await bus.publish(sent)

    # assert: one proposal, its plan and every candidate's outcome carry release and evidence
    release_id = field_release_id("tiny", "1.0.0", "det-tiny-1")
    plan, *outcomes = await await_events(bus, OUTCOMES, count=3, where=_is_proposal,
                                         timeout_s=120)  # fmt: skip
    assert plan.type == "slmops.optimization.planned.v1"
    assert (plan.data.release_id, plan.data.field) == (release_id, finding.evidence())
    # nothing measured yet: the lower precision first (derived, as the class has no 4-bit one),
    # then the class's other recipe (already built for the version's release: reused)
    assert [j.recipe_name for j in plan.data.jobs] == ["int8-weight-only-to-int4",
                                                       "int8-weight-only"]  # fmt: skip
    assert jobs["int8-weight-only"] == plan.data.jobs[1].variant_id
    assert {e.data.variant_id for e in outcomes} == {j.variant_id for j in plan.data.jobs}
    for outcome in outcomes:
        assert outcome.type == "slmops.optimization.completed.v1", outcome.data
        assert (outcome.data.release_id, outcome.data.field) == (release_id, finding.evidence())
        assert outcome.id == derive_event_id("optimization.outcome", release_id,
                                             outcome.data.variant_id)  # fmt: skip
    # one trace from the finding on (traceparent: version-trace id-span id-flags)
    [published] = await await_events(bus, "slmops.fleet.regression.detected.v1.>", count=1)
    finding_trace = published.traceparent.split("-")[1]
    assert [e.traceparent.split("-")[1] for e in (plan, *outcomes)] == [finding_trace] * 3
    reopened = (await pipeline.optimizer.get(f"/v1/jobs/{jobs['int8-weight-only']}")).json()
    assert reopened["state"] == "reused"

    # the validator's decision on the proposal closes the class's re-optimization: the next
    # finding for the class waits out the cooldown
    [decided] = await await_events(bus, "slmops.release.*.v1", count=1, timeout_s=120,
                                   where=lambda e: e.data.proposal is not None)  # fmt: skip
    assert (decided.data.release_id, decided.data.proposal) == (release_id, finding.evidence())
    loop = await pipeline.context.reoptimizations()

    async def closed() -> bool:
        entry = await loop.get("tiny", "field-cpu")
        return entry is not None and entry.closed_at is not None

    await until_answered(closed, "the proposal's release to close the re-optimization")
    entry = await loop.get("tiny", "field-cpu")
    assert entry.outcome == decided.type.split(".")[2]  # created or failed
