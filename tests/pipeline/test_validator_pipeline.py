"""The validator on real parts: MiniLM published through the registry, optimized per class,
judged per class with ONNX Runtime, reports stored through the registry, a release per class
(real NATS, moto S3, ONNX Runtime)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slmops.bus import Bus
from slmops.profiles import load_profile
from slmops.reports import ValidationReport
from slmops.testing.events import await_events, stream_count
from slmops.testing.models import with_word_tokenizer
from slmops_validator.checks.host import host_stands_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROFILES = Path(__file__).parent / "profiles-validator"


@pytest.fixture
def optimizer_overrides() -> dict[str, Any]:
    return {"profiles_dir": PROFILES}


async def test_minilm_variants_judged_per_class_and_released(
    pipeline: Any, validator: Any, bus: Bus, minilm_folder: Path, pack: Callable[[Path], bytes]
) -> None:
    # setup / execute: the real all-MiniLM-L6-v2 for a CPU class and a static-QDQ NPU class
    await pipeline.publish(
        pack(minilm_folder),
        model_name="minilm",
        format="hf-safetensors",
        task="feature-extraction",
        device_classes=["test-cpu", "test-npu"],
    )
    outcomes = await await_events(bus, "slmops.validation.*.v1", count=4, timeout_s=420)
    release = (await await_events(bus, "slmops.release.created.v1", count=1, timeout_s=60))[0]
    planned = (await await_events(bus, "slmops.optimization.planned.v1", count=1))[0]
    recipes = {job.variant_id: job.recipe_name for job in planned.data.jobs}

    # assert: each candidate judged once, with its report stored through the registry
    by_key = {(e.data.device_class, recipes[e.data.variant_id]): e for e in outcomes}
    verdicts = {key: e.type.split(".")[2] for key, e in by_key.items()}
    assert await stream_count(bus, "SLMOPS_PIPELINE", "slmops.validation.*.v1") == 4
    assert await stream_count(bus, "SLMOPS_PIPELINE", "slmops.release.created.v1") == 1
    assert verdicts == {
        ("test-cpu", "int8-dynamic"): "passed",
        ("test-cpu", "pruned-50"): "failed",
        ("test-npu", "int8-dynamic"): "failed",
        ("test-npu", "int8-static-qdq"): "passed",
    }
    reports = {key: await _report(pipeline, e.data.variant_id) for key, e in by_key.items()}

    good = reports[("test-cpu", "int8-dynamic")]
    gates = {g.name: g for g in good.gates}
    assert gates["parity.cosine_mean"].value > 0.98
    assert gates["parity.cosine_mean"].passed
    assert gates["runtime.load"].passed
    assert gates["runtime.non_finite_outputs"].value == 0
    # latency counts only where this host stands for the class (x86-64 with AVX2); elsewhere
    # it is reported as not measurable and left to the canaries, not faked
    cpu_why = host_stands_for(load_profile(PROFILES / "test-cpu.yaml"))
    if not cpu_why:
        assert gates["latency.p95_ms"].value > 0
        assert "not measurable" not in gates["latency.p95_ms"].detail
        assert gates["latency.p95_ratio"].value > 0
    else:
        assert gates["latency.p95_ms"].value is None
        assert gates["latency.p95_ms"].passed is None
        assert f"not measurable on this host: {cpu_why}" in gates["latency.p95_ms"].detail
        assert "latency.p95_ratio" not in gates  # the class sets no ratio budget
    assert gates["size.size_mb"].value < 30
    assert 0 < gates["runtime.peak_memory_mb"].value < 2048
    assert gates["parity.accuracy_drop_pct"].value < 10  # topics of the built-in set
    assert good.eval_set is not None
    assert good.eval_set.examples == 96

    assert good.markdown.startswith(f"# Validation of `{good.variant_id}`")  # stored rendered too

    # the damaged (50% pruned) variant fails the parity gate with the measured figure
    pruned = reports[("test-cpu", "pruned-50")]
    cosine = next(g for g in pruned.gates if g.name == "parity.cosine_mean")
    assert cosine.passed is False
    assert cosine.value is not None
    assert cosine.value < 0.98
    assert f"parity.cosine_mean {cosine.value:.4g} < 0.98" in pruned.reason
    assert pruned.reason == by_key[("test-cpu", "pruned-50")].data.reason

    # dynamic INT8 is not static QDQ: the NPU class refuses it by structure, operators named
    npu_dynamic = reports[("test-npu", "int8-dynamic")]
    failed = {g.name for g in npu_dynamic.gates if g.passed is False}
    assert {"structure.unsupported_operators", "structure.static_qdq"} <= failed
    assert "DynamicQuantizeLinear" in npu_dynamic.reason
    # latency on an NPU class is not faked: reported as not measurable here
    npu_qdq = reports[("test-npu", "int8-static-qdq")]
    latency = next(g for g in npu_qdq.gates if g.name == "latency.p95_ms")
    assert latency.value is None
    assert latency.passed is None
    assert "not measurable on this host" in latency.detail

    # the release names the passing variant per class, by the class's objective
    entries = {e.device_class: e for e in release.data.entries}
    assert entries["test-cpu"].variant_id == by_key[("test-cpu", "int8-dynamic")].data.variant_id
    if not cpu_why:
        assert entries["test-cpu"].reason.startswith("fastest of 1 passed")
    else:
        assert entries["test-cpu"].reason.startswith("smallest of 1 passed")
        assert "latency is not measurable on this host" in entries["test-cpu"].reason
    assert entries["test-npu"].variant_id == by_key[("test-npu", "int8-static-qdq")].data.variant_id
    assert entries["test-npu"].reason.startswith("smallest of 1 passed")

    # the lineage shows the verdicts, and the validator's own API the tally
    tally = (await validator.api.get(f"/v1/releases/minilm/{release.data.version}")).json()
    assert tally["released"] is True
    assert len(tally["judged"]) == 4


async def _report(pipeline: Any, variant_id: str) -> ValidationReport:
    response = await pipeline.registry.get(f"/v1/variants/{variant_id}/report")
    assert response.status_code == 200, response.text
    return ValidationReport.model_validate(response.json()["report"])


async def test_the_same_artifact_as_a_new_version_is_judged_and_released_again(
    pipeline: Any, validator: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: a small encoder published and released as 1.0.0
    data = with_word_tokenizer(tiny_onnx())
    fields = {"model_name": "tiny", "format": "onnx", "task": "feature-extraction",
              "device_classes": ["test-cpu"]}  # fmt: skip
    await pipeline.publish(data, **fields)
    first = await await_events(bus, "slmops.release.created.v1", count=1, timeout_s=300)

    # execute: the very same bytes published as 1.1.0 (its variants are reused, not rebuilt)
    await pipeline.publish(data, **{**fields, "version": "1.1.0"})
    releases = await await_events(bus, "slmops.release.created.v1", count=2, timeout_s=300)

    # assert: the new version's outcomes are announced as its own (not dropped as duplicates
    # of 1.0.0's), with the verdicts 1.0.0 got, and it is released with the same variants
    def of(version: str) -> Callable[[Any], bool]:
        return lambda e: e.data.version == version

    planned = (await await_events(bus, "slmops.optimization.planned.v1", count=2))[0]
    jobs = len(planned.data.jobs)
    old = await await_events(bus, "slmops.validation.*.v1", count=jobs, where=of("1.0.0"))
    new = await await_events(bus, "slmops.validation.*.v1", count=jobs, where=of("1.1.0"))
    completed = await await_events(bus, "slmops.optimization.completed.v1", count=jobs,
                                   where=of("1.1.0"))  # fmt: skip
    assert {(e.data.variant_id, e.type) for e in new} == {(e.data.variant_id, e.type) for e in old}
    assert {e.data.variant_id for e in completed} == {e.data.variant_id for e in old}
    assert releases[1].data.version == "1.1.0"
    assert [e.variant_id for e in releases[1].data.entries] == [
        e.variant_id for e in first[0].data.entries
    ]
