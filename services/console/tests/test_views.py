"""What the version page shows, computed from lineage documents: a real one (MiniLM's journey
through the demo: six variants over two classes, two chosen, one rollout) and a decoder's,
whose gates are the generation ones (time to first token, greedy agreement)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from slmops_console.views import lineage, pareto

MINILM = json.loads((Path(__file__).parent / "minilm-lineage.json").read_text())
X86, ARM = "x86-avx512-vnni", "arm64-pi5"


def _gate(name: str, value: float | None, budget: float | None = None, unit: str = "",
          bound: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {"name": name, "value": value, "budget": budget, "unit": unit, "bound": bound,
            "passed": None if budget is None else True, "detail": ""}  # fmt: skip


def _decoder_lineage() -> dict[str, Any]:
    """SmolLM2-like: two int4/int8 variants for one class, judged on generation gates."""
    variants = []
    figures = (("v-a", "int4-rtn", 200e6, 98.0, 0.61),
               ("v-b", "int8-weight-only", 340e6, 150.0, 0.97))  # fmt: skip
    for variant_id, recipe, size, ttft, share in figures:
        gates = [_gate("generation.ttft_ms", ttft, 250.0, "ms", "max"),
                 _gate("generation.tpot_p50_ms", 7.0, None, "ms", "max"),
                 _gate("generation.greedy_identical_share", share, 0.5, "", "min"),
                 _gate("size.size_mb", size / 1e6, 512.0, "MB", "max")]  # fmt: skip
        report = {"verdict": "passed", "gates": gates, "event_id": variant_id, "time": "t"}
        variants.append({"variant_id": variant_id, "device_class": X86, "size_bytes": size,
                         "recipe": {"name": recipe}, "reports": [report],
                         "metrics": {}})  # fmt: skip
    release = {"release_id": "rel-1", "entries": [{"device_class": X86, "variant_id": "v-a"}]}
    return {"model_name": "smollm2", "version": "1.0.0", "variants": variants,
            "releases": [release], "rollouts": [], "gateways": {}}  # fmt: skip


def test_the_lineage_picture_has_every_step_of_the_journey_in_its_column() -> None:
    picture = lineage.build(MINILM)

    columns: dict[int, list[lineage.Node]] = {}
    for node in picture.nodes:
        columns.setdefault(node.column, []).append(node)
    assert [len(columns[c]) for c in range(6)] == [1, 6, 6, 1, 1, 2]
    assert sorted(n.title for n in columns[2]) == ["report: failed"] * 3 + ["report: passed"] * 3
    assert columns[3][0].detail == "2 of 2 classes"
    assert (columns[4][0].detail, columns[4][0].tone) == ("completed", "passed")
    # the (trimmed) lineage's gateways, counted per class of the variant they run
    assert sorted((n.title, n.detail) for n in columns[5]) == [
        ("2 gateways applied", ARM),
        ("4 gateways applied", X86),
    ]
    # the release is fed by exactly the chosen variants' reports; rows never overlap
    chosen = {e["variant_id"] for e in MINILM["releases"][0]["entries"]}
    into_release = {s.removeprefix("r:") for s, t in picture.edges if t.startswith("rel:")}
    assert into_release == chosen
    spots = [(n.column, n.row) for n in picture.nodes]
    assert len(spots) == len(set(spots))
    assert len(picture.paths()) == len(picture.edges)


def test_with_the_fleets_counts_the_picture_shows_who_runs_each_variant_now() -> None:
    chosen = [e["variant_id"] for e in MINILM["releases"][0]["entries"]]  # arm, x86
    running = {chosen[0]: 90, chosen[1]: 210, "v-not-running": 0}

    picture = lineage.build({**MINILM, "gateways": {}}, running)

    gateways = sorted((n.title, n.detail) for n in picture.nodes if n.column == 5)
    assert gateways == [("210 gateways running", X86), ("90 gateways running", ARM)]
    rollout = MINILM["rollouts"][-1]["rollout_id"]
    assert {s for s, t in picture.edges if t.startswith("g:")} == {f"ro:{rollout}"}


def test_variant_charts_put_each_class_on_size_and_latency_with_its_budgets() -> None:
    charts = {c.device_class: c for c in pareto.charts(MINILM)}

    x86 = charts[X86]
    (chosen,) = [p for p in x86.points if p.chosen]
    assert (chosen.recipe, chosen.verdict) == ("int8-dynamic-per-channel", "passed")
    assert chosen.size_mb == pytest.approx(23.27, abs=0.01)
    assert chosen.latency_ms == pytest.approx(44.58, abs=0.01)  # its p95
    assert (x86.quality_name, x86.quality_budget) == ("parity.cosine_mean", 0.98)
    # the budget is a ratio to the fp32 reference (p95 <= 1x): drawn at the reference's p95
    assert x86.latency_budget_ms == pytest.approx(44.58 / 0.5776, rel=1e-3)
    assert x86.size_budget_mb == 512.0
    assert sorted(p.verdict for p in x86.points) == ["failed", "failed", "passed"]
    # arm is not measurable on this host: no latency, and the chart says why
    arm = charts[ARM]
    assert {p.latency_ms for p in arm.points} == {None}
    assert "not measurable on this host" in arm.latency_note
    assert [p.recipe for p in arm.points if p.chosen] == ["int8-dynamic-per-channel"]
    assert json.loads(json.dumps(arm.as_json()))["device_class"] == ARM


def test_a_decoders_chart_uses_time_to_first_token_and_greedy_agreement() -> None:
    (chart,) = pareto.charts(_decoder_lineage())

    assert [(p.variant_id, p.latency_ms, p.quality, p.chosen) for p in chart.points] == [
        ("v-a", 98.0, 0.61, True),
        ("v-b", 150.0, 0.97, False),
    ]
    assert (chart.latency_budget_ms, chart.size_budget_mb) == (250.0, 512.0)
    assert (chart.quality_name, chart.quality_budget) == ("generation.greedy_identical_share", 0.5)


def test_a_version_still_optimizing_draws_what_it_has() -> None:
    young = {**MINILM, "variants": [{**MINILM["variants"][0], "reports": []}], "releases": [],
             "rollouts": [], "gateways": {}}  # fmt: skip

    (chart,) = pareto.charts(young)
    picture = lineage.build(young)

    assert [(p.verdict, p.latency_ms) for p in chart.points] == [("pending", None)]
    assert chart.points[0].quality == pytest.approx(0.9803, abs=1e-4)  # the optimizer's own
    assert [n.column for n in picture.nodes] == [0, 1]
