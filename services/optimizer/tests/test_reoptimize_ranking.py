"""Which candidates a field regression gets, in which order: the class's other recipes and the
lower precisions the pass registry allows, ranked by the field evidence."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmops.events import variant_id_for
from slmops.events.payloads import FieldEvidence
from slmops.profiles import DeviceProfile, load_profiles
from slmops_optimizer.reoptimize import (
    DERIVED_INT8_DYNAMIC,
    Candidate,
    Known,
    candidates_for,
    precision_of,
    rank,
)

PROFILES = Path(__file__).resolve().parents[3] / "deploy" / "profiles"
PARENT = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def profiles() -> dict[str, DeviceProfile]:
    return load_profiles(PROFILES)


def _recipe_variant(profile: DeviceProfile, name: str) -> str:
    recipe = next(r.recipe() for r in profile.recipes if r.name == name)
    return variant_id_for(PARENT, recipe, profile.name)


def _evidence(variant_id: str, **fields: object) -> FieldEvidence:
    values: dict[str, object] = {
        "detection_id": "d1", "device_class": "arm64-pi5", "variant_id": variant_id,
        "metric": "latency_p95_ms", "bound": "max", "budget": 250.0, "field_value": 400.0,
        **fields,
    }  # fmt: skip
    return FieldEvidence.model_validate(values)


def _candidates(profile: DeviceProfile, regressed: str, task: str = "feature-extraction"):  # type: ignore[no-untyped-def]
    regressed_recipe = next(r.recipe() for r in profile.recipes if r.name == regressed)
    return candidates_for(profile, "onnx", task, PARENT,
                          variant_id_for(PARENT, regressed_recipe, profile.name),
                          regressed_recipe)  # fmt: skip


def test_every_other_recipe_of_the_class_and_a_lower_precision_of_the_regressed_one(
    profiles: dict[str, DeviceProfile],
) -> None:
    found = _candidates(profiles["arm64-pi5"], regressed="int8-weight-only")

    names = [c.recipe.name for c in found]
    # the regressed recipe is gone; gguf is for another format; its 4 bits are not derived
    # again from the 8-bit recipe: the class has a 4-bit weight-only recipe of its own
    assert names == ["int4-weight-only", "int8-dynamic-per-channel"]
    assert [c.precision for c in found] == ["int4", "int8"]
    assert all(c.variant_id == variant_id_for(PARENT, c.recipe, "arm64-pi5") for c in found)


def test_derived_recipes_follow_what_the_class_runs(profiles: dict[str, DeviceProfile]) -> None:
    # a class with 8-bit weight-only and no 4-bit recipe: the 4 bits are derived (same blocks)
    x86 = profiles["x86-avx512-vnni"]
    no_int4 = x86.model_copy(update={"recipes": [r for r in x86.recipes if "int4" not in r.name]})
    found = _candidates(no_int4, regressed="int8-dynamic-per-channel")
    derived = [c for c in found if c.derived_from]
    assert [(c.recipe.name, c.precision) for c in derived] == [("int8-weight-only-to-int4", "int4")]
    assert derived[0].recipe.passes[-1].config == {"bits": 4, "block_size": 32, "symmetric": True}
    # ... unless the class cannot run it
    no_nbits = no_int4.model_copy(update={"unsupported_operators": ["MatMulNBits"]})
    assert [c.derived_from for c in _candidates(no_nbits, "int8-dynamic-per-channel")] == [None]

    # the NPU runs static QDQ only: no dynamic INT8, no MatMulNBits
    npu = profiles["npu-qdq-int8"]
    npu_found = _candidates(npu, regressed="int8-static-qdq-minmax")
    assert [c.recipe.name for c in npu_found] == ["int8-static-qdq-entropy"]

    # an encoder on a class with weight-only recipes only gets dynamic INT8 derived for it
    only_wo = profiles["arm64-pi5"].model_copy(
        update={"recipes": [r for r in profiles["arm64-pi5"].recipes if "weight-only" in r.name]}
    )
    names = [c.recipe.name for c in _candidates(only_wo, regressed="int4-weight-only")]
    assert names == ["int8-weight-only", DERIVED_INT8_DYNAMIC]
    assert _candidates(only_wo, regressed="int4-weight-only")[1].precision == "int8"
    decoder = _candidates(only_wo, regressed="int4-weight-only", task="text-generation")
    assert [c.recipe.name for c in decoder] == ["int8-weight-only"]


def test_the_field_evidence_decides_the_order(profiles: dict[str, DeviceProfile]) -> None:
    pi = profiles["arm64-pi5"]
    regressed = _recipe_variant(pi, "int8-dynamic-per-channel")
    found = _candidates(pi, regressed="int8-dynamic-per-channel")
    by_name = {c.recipe.name: c for c in found}
    assert set(by_name) == {"int4-weight-only", "int8-weight-only"}
    evidence = _evidence(regressed)
    # int8 weight-only measured 0.55x the regressed variant, int4 0.6x: 220 vs 240 ms predicted
    known = {by_name["int4-weight-only"].variant_id: Known(ratio=0.6, size_mb=5),
             by_name["int8-weight-only"].variant_id: Known(ratio=0.55, size_mb=9)}  # fmt: skip

    ranking = rank(evidence, found, known, cap=3)

    assert [r.candidate.recipe.name for r in ranking.chosen] == [
        "int8-weight-only", "int4-weight-only"
    ]  # fmt: skip
    assert [r.predicted for r in ranking.chosen] == [pytest.approx(220), pytest.approx(240)]
    assert ranking.dropped == []


def _candidate(name: str, precision: str) -> Candidate:
    from slmops.events.payloads import PassSpec, Recipe

    recipe = Recipe(name=name, passes=[PassSpec(name="convert")])
    return Candidate(recipe, f"v-{name}", precision)  # type: ignore[arg-type]


def test_measured_ones_first_then_unmeasured_by_precision_and_size_slower_ones_dropped() -> None:
    evidence = _evidence("v-regressed")
    found = [_candidate("fp16", "fp16"), _candidate("slower", "int4"),
             _candidate("int8-big", "int8"), _candidate("int8-small", "int8"),
             _candidate("not-enough", "int4"), _candidate("fast", "fp32"),
             _candidate("int4", "int4")]  # fmt: skip
    known = {"v-slower": Known(ratio=1.3, basis="latency.p95_ms on the host"),
             "v-int8-big": Known(size_mb=40), "v-int8-small": Known(size_mb=10),
             "v-not-enough": Known(ratio=0.9), "v-fast": Known(ratio=0.5)}  # fmt: skip

    ranking = rank(evidence, found, known, cap=4)

    assert [r.candidate.recipe.name for r in ranking.chosen] == [
        "fast", "int4", "int8-small", "int8-big"
    ]  # fmt: skip
    dropped = {c.recipe.name: why for c, why in ranking.dropped}
    assert dropped["slower"] == "no better than v-regressed (x1.30, latency.p95_ms on the host)"
    assert dropped["not-enough"] == "predicted 360 in the field (x0.90)"
    assert dropped["fp16"] == "beyond the 4 candidates tried"


def test_a_min_bound_is_met_by_a_higher_figure() -> None:
    evidence = _evidence("v-regressed", metric="decode_tokens_per_s", bound="min", budget=8.0,
                         field_value=6.0)  # fmt: skip
    found = [_candidate("slower", "int4"), _candidate("a-bit", "int8"), _candidate("much", "int8")]
    known = {"v-slower": Known(ratio=0.8), "v-a-bit": Known(ratio=1.2),
             "v-much": Known(ratio=2.0)}  # fmt: skip

    ranking = rank(evidence, found, known, cap=3)

    assert [(r.candidate.recipe.name, r.predicted) for r in ranking.chosen] == [("much", 12.0)]
    assert {c.recipe.name for c, _ in ranking.dropped} == {"slower", "a-bit"}


def test_nothing_left_says_why_for_the_operator(profiles: dict[str, DeviceProfile]) -> None:
    jetson = profiles["jetson-orin-gpu"]
    found = _candidates(jetson, regressed="fp16")
    # fp16 is the lowest it runs (no MatMulNBits, no int8): only fp32 is left, measured slower
    assert [c.recipe.name for c in found] == ["fp32-optimized"]
    evidence = _evidence(_recipe_variant(jetson, "fp16"), device_class="jetson-orin-gpu",
                         budget=50.0, field_value=80.0)  # fmt: skip

    ranking = rank(evidence, found, {found[0].variant_id: Known(ratio=1.8)}, cap=3)

    assert ranking.chosen == []
    reason = ranking.nothing_left(evidence, "unused")
    assert reason.startswith("no recipe left that could meet latency_p95_ms <= 50 in the field")
    assert reason.endswith(f"fp32-optimized: no better than {evidence.variant_id} (x1.80)")
    no_candidate = rank(evidence, [], {}, cap=3)
    assert no_candidate.nothing_left(evidence, "no other recipe").endswith("): no other recipe")


def test_precision_of_a_recipe() -> None:
    from slmops.events.payloads import PassSpec, Recipe

    def recipe(*passes: tuple[str, dict[str, object]]) -> Recipe:
        return Recipe(name="r", passes=[PassSpec(name=n, config=c) for n, c in passes])

    assert precision_of(recipe(("convert", {}), ("weight_only", {"bits": 8}))) == "int8"
    assert precision_of(recipe(("convert", {}), ("weight_only", {}))) == "int4"  # the default
    assert precision_of(recipe(("convert", {}), ("fp16", {}))) == "fp16"
    assert precision_of(recipe(("convert", {}), ("graph_optimize", {}))) == "fp32"


def test_a_figure_the_devices_measured_outranks_a_host_prediction() -> None:
    evidence = _evidence("v-regressed")  # 400 ms in the field, budget 250
    found = [_candidate("host-fast", "int4"), _candidate("field-ok", "int8"),
             _candidate("field-slow", "int4")]  # fmt: skip
    # host-fast looks 0.5x on the host, but field-slow ran on these devices at 300 ms
    known = {"v-host-fast": Known(ratio=0.5),
             "v-field-ok": Known(field_value=180.0, basis="measured by the devices"),
             "v-field-slow": Known(ratio=0.3, field_value=300.0)}  # fmt: skip

    ranking = rank(evidence, found, known, cap=3)

    assert [(r.candidate.recipe.name, r.predicted) for r in ranking.chosen] == [
        ("field-ok", 180.0), ("host-fast", 200.0)
    ]  # fmt: skip
    assert ranking.dropped == [(found[2], "measured 300 in the field (x0.75)")]
