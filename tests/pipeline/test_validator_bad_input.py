"""Bad variants and bad evaluation sets: each ends in ``validation.failed`` (or a report that
says what was done), with a reason a person can act on; the validator stays up.

The variants are crafted here (not optimized) and announced as ``optimization.completed`` with
the published fp32 model as their reference: real NATS, moto S3 and ONNX Runtime judge them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

from slmops.bus import Bus
from slmops.events import OptimizationCompleted, new_event, variant_id_for
from slmops.events.payloads import ArtifactRef, PassSpec, Recipe
from slmops.reports import ValidationReport
from slmops.testing.events import await_events, stream_count
from slmops.testing.models import with_word_tokenizer
from slmops_validator.validate import Subject, validate

pytestmark = [pytest.mark.integration]

PROFILES = Path(__file__).parent / "profiles-validator"


@pytest.fixture
def optimizer_overrides() -> dict[str, Any]:
    return {"profiles_dir": PROFILES}


async def _publish_reference(pipeline: Any, data: bytes, **fields: Any) -> ArtifactRef:
    # No class the optimizer knows: it plans nothing, the variants below are hand-made.
    published = await pipeline.publish(
        data, model_name="tiny", format="onnx", task="feature-extraction",
        device_classes=["not-a-class"], **fields,
    )  # fmt: skip
    return ArtifactRef.model_validate(published["manifest"]["artifact"])


async def _store_crafted(
    pipeline: Any, reference: ArtifactRef, data: bytes, recipe: str
) -> OptimizationCompleted:
    """Store a crafted variant through the registry; the completion an optimizer would send."""
    uploaded = (await pipeline.registry.post("/v1/blobs", content=data)).json()
    recipe_obj = Recipe(name=recipe, passes=[PassSpec(name="convert")])
    variant_id = variant_id_for(reference.digest, recipe_obj, "test-cpu")
    stored = await pipeline.registry.post("/v1/variants", json={
        "model_name": "tiny", "version": "1.0.0", "variant_id": variant_id,
        "device_class": "test-cpu", "recipe": recipe_obj.model_dump(mode="json"),
        "artifact_digest": uploaded["digest"],
    })  # fmt: skip
    assert stored.status_code == 201, stored.text
    return OptimizationCompleted(
        model_name="tiny", version="1.0.0", variant_id=variant_id, device_class="test-cpu",
        parent_digest=reference.digest, recipe=recipe_obj,
        artifact=ArtifactRef.model_validate(stored.json()["manifest"]["artifact"]),
        manifest_digest=stored.json()["digest"], duration_s=0.1, reference=reference,
    )  # fmt: skip


async def _announce(
    pipeline: Any, bus: Bus, reference: ArtifactRef, data: bytes, recipe: str
) -> Any:
    """Store a crafted variant through the registry and announce it; return its outcome."""
    completed = await _store_crafted(pipeline, reference, data, recipe)
    variant_id = completed.variant_id
    await bus.publish(new_event(completed, source="/test"))
    outcomes = await await_events(bus, "slmops.validation.*.v1", count=1, timeout_s=120,
                                  where=lambda e: e.data.variant_id == variant_id)  # fmt: skip
    return outcomes[0]


async def test_crashing_nan_and_misshapen_variants_fail_with_reasons(
    pipeline: Any, validator: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: the fp32 reference, then three broken variants of it
    reference = await _publish_reference(pipeline, tiny_onnx())

    # execute / assert: an operator ONNX Runtime has no kernel for fails at load
    crash = await _announce(pipeline, bus, reference, tiny_onnx(op_domain="com.example.x"), "crash")
    assert crash.type == "slmops.validation.failed.v1"
    assert "runtime.load" in crash.data.reason
    assert "com.example.x" in crash.data.reason

    # weights with NaN produce NaN: named, with the count of bad values
    nan = await _announce(pipeline, bus, reference, _with_nan(tiny_onnx()), "nan")
    assert nan.type == "slmops.validation.failed.v1"
    assert "runtime.non_finite_outputs" in nan.data.reason
    report = await _report(pipeline, nan.data.variant_id)
    parity = next(c for c in report.checks if c.name == "parity")
    assert any("not comparable" in note for note in parity.notes)

    # a different hidden size: the outputs' shapes differ from the reference's
    shaped = await _announce(pipeline, bus, reference, tiny_onnx(hidden=32), "misshapen")
    assert shaped.type == "slmops.validation.failed.v1"
    assert "parity.output_shape_mismatches 32 > 0" in shaped.data.reason  # all 32 inputs
    gate = next(g for g in shaped.data.gates if g.name == "parity.output_shape_mismatches")
    assert "32" in gate.detail
    assert "64" in gate.detail

    # the service stayed up and still judges a good variant (the reference itself) as passing
    assert (await validator.api.get("/readyz")).status_code == 200
    same = await _announce(pipeline, bus, reference, tiny_onnx(), "identity")
    assert same.type == "slmops.validation.passed.v1", same.data
    cosine = next(g for g in same.data.gates if g.name == "parity.cosine_mean")
    assert cosine.value == pytest.approx(1.0, abs=1e-6)

    # announced again (a new event id, as after the dedup window): the stored verdict is
    # re-sent under the same outcome id, not judged again - one outcome, one report
    passed_before = await stream_count(bus, "SLMOPS_PIPELINE", "slmops.validation.passed.v1")
    completed = (await await_events(bus, "slmops.optimization.completed.v1", count=4))[-1]
    await bus.publish(new_event(completed.data, source="/test"))
    await _consumer_idle(bus, "SLMOPS_PIPELINE", "validator-pipeline")
    assert await stream_count(bus, "SLMOPS_PIPELINE", "slmops.validation.passed.v1") == 1
    assert passed_before == 1
    keys = await (await bus.key_value("slmops-variants")).keys()
    assert sum(k.startswith(f"report.{same.data.variant_id}.") for k in keys) == 1


async def test_invalid_jsonl_evaluation_set_fails_the_variant_naming_the_line(
    pipeline: Any, validator: Any, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: an evaluation set no parser accepts, put in the store by a foreign producer
    reference = await _publish_reference(pipeline, tiny_onnx())
    bad = b'{"text": "fine"}\n{"text": "broken\n'
    eval_set = await validator.put_blob(bad)

    # execute
    report = await _validate(validator, reference, eval_set)

    # assert
    assert report.verdict == "failed"
    assert "eval_set.valid" in report.reason
    assert "line 2" in report.reason


async def test_texts_longer_than_the_model_are_truncated_and_said(
    pipeline: Any, validator: Any, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: a model with a 16-token limit and texts of 40 words
    model = with_word_tokenizer(tiny_onnx(), max_length=16)
    reference = await validator.put_blob(model)
    lines = [json.dumps({"text": " ".join(["w1"] * 40)}), json.dumps({"text": "w2 w3"})]
    eval_set = await validator.put_blob(("\n".join(lines) + "\n").encode())

    # execute
    report = await _validate(validator, reference, eval_set, candidate=reference)

    # assert: judged (the identical model passes), the cut said in the report
    assert report.verdict == "passed", report.reason
    assert report.eval_set is not None
    assert (report.eval_set.truncated, report.eval_set.max_tokens) == (1, 16)
    parity = next(c for c in report.checks if c.name == "parity")
    assert "1 of 2 texts were longer than 16 tokens and were truncated" in parity.notes[0]


# --- helpers --------------------------------------------------------------------------------


async def _consumer_idle(bus: Bus, stream: str, durable: str, timeout_s: float = 60) -> None:
    """Wait until the durable consumer has nothing pending or unacknowledged."""
    for _ in range(int(timeout_s * 10)):
        info = await bus.js.consumer_info(stream, durable)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{durable} still busy after {timeout_s} s")


async def _validate(
    validator: Any, reference: ArtifactRef, eval_set: ArtifactRef, *, candidate: Any = None
) -> ValidationReport:
    recipe = Recipe(name="identity", passes=[PassSpec(name="convert")])
    completed = OptimizationCompleted(
        model_name="tiny", version="1.0.0", variant_id="v-direct", device_class="test-cpu",
        parent_digest=reference.digest, recipe=recipe, artifact=candidate or reference,
        duration_s=0.0, reference=reference,
    )  # fmt: skip
    ctx = validator.context
    subject = Subject(completed, "feature-extraction", eval_set)
    return await validate(subject, ctx.profiles["test-cpu"], ctx.models, ctx.settings)


async def _report(pipeline: Any, variant_id: str) -> ValidationReport:
    response = await pipeline.registry.get(f"/v1/variants/{variant_id}/report")
    assert response.status_code == 200, response.text
    return ValidationReport.model_validate(response.json()["report"])


def _with_nan(data: bytes) -> bytes:
    import numpy as np
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "w1":
            values = numpy_helper.to_array(init).copy()
            values[0, :] = np.nan
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, "w1"))
    return model.SerializeToString()


async def test_a_forged_completion_naming_other_bytes_is_refused_not_judged(
    pipeline: Any, validator: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: a genuine variant in the registry, and other bytes (a different model) in the store
    reference = await _publish_reference(pipeline, tiny_onnx())
    genuine = await _store_crafted(pipeline, reference, tiny_onnx(), "genuine")
    other = await validator.put_blob(tiny_onnx(hidden=48))

    # execute: completions with the genuine id and manifest, but other bytes or another baseline
    for forged in (
        genuine.model_copy(update={"artifact": other}),
        genuine.model_copy(update={"reference": other}),
    ):  # a baseline it would pass
        await bus.publish(new_event(forged, source="/test"))

    # assert: both dead-lettered with the reason; no verdict, no report for the variant
    letters = await await_events(bus, "slmops.deadletter.>", count=2, timeout_s=60)
    reasons = sorted(letter.data.reason for letter in letters)
    assert all("disagrees with the variant's signed manifest" in r for r in reasons), reasons
    assert any(f"artifact {other.digest}" in r for r in reasons), reasons
    assert any(f"reference {other.digest}" in r for r in reasons), reasons
    assert await stream_count(bus, "SLMOPS_PIPELINE", "slmops.validation.*.v1") == 0
    report = await pipeline.registry.get(f"/v1/variants/{genuine.variant_id}/report")
    assert report.status_code == 404
