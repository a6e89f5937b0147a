"""int8_dynamic on all-MiniLM-L6-v2: size, quality per scheme, bad inputs, the refinement ladder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

from slmops.events.payloads import PassSpec, Recipe
from slmops.profiles import QualityFloors
from slmops_optimizer.passes import OnnxModel, PassContext, PassError, create_pass
from slmops_optimizer.passes.int8_dynamic import Int8Dynamic
from slmops_optimizer.search import search

from .conftest import Encoder, Optimized, corrupt_model, custom_op_model


def test_per_channel_after_fusion_quarter_size_and_close_to_fp32(
    minilm: Encoder,
    minilm_fused: Optimized,
    make_ctx: Callable[..., PassContext],
    clean_cwd: Path,
) -> None:
    # The x86/arm64 recipe: graph_optimize (Attention, EmbedLayerNormalization) then this.
    ctx = make_ctx(minilm.samples)
    out = Int8Dynamic.from_config({"per_channel": True}).run(minilm_fused.model, ctx)

    assert out.path == ctx.work_dir.resolve() / "01-int8_dynamic" / "model.onnx"
    assert out.size_bytes < 0.3 * minilm.model.size_bytes  # 90 MB -> ~23 MB, embeddings too
    ops = {n.op_type for n in onnx.load(str(out.path), load_external_data=False).graph.node}
    assert {"QAttention", "QEmbedLayerNormalization"} <= ops
    parity = minilm.parity(out)
    assert parity.cosine_mean >= 0.98, parity
    assert any("per-channel" in line for line in ctx.log)
    assert sorted(p.name for p in minilm_fused.model.path.parent.iterdir()) == ["model.onnx"]
    assert not (ctx.work_dir / ".tmp").exists()


def test_per_tensor_is_worse(minilm: Encoder, make_ctx: Callable[..., PassContext]) -> None:
    out = Int8Dynamic.from_config({}).run(minilm.model, make_ctx(minilm.samples))
    assert minilm.parity(out).cosine_mean < 0.98  # why the ladder starts with per-channel


def test_runs_twice_in_one_job_and_keeps_excluded_nodes(
    tiny_decoder: OnnxModel, make_ctx: Callable[..., PassContext]
) -> None:
    ctx = make_ctx(task="text-generation")
    first = Int8Dynamic.from_config({}).run(tiny_decoder, ctx)
    second = Int8Dynamic.from_config(
        {"op_types": ["MatMul"], "nodes_to_exclude": ["/lm_head/MatMul"]}
    ).run(tiny_decoder, ctx)

    assert first.path.parent.name == "01-int8_dynamic"
    assert second.path.parent.name == "02-int8_dynamic"
    assert second.size_bytes > 2 * first.size_bytes  # embeddings and lm_head left in fp32
    graph = onnx.load(str(second.path)).graph
    assert "/lm_head/MatMul" in {n.name for n in graph.node if n.op_type == "MatMul"}


def test_decoder_ladder_keeps_lm_head_first(
    tiny_decoder: OnnxModel, make_ctx: Callable[..., PassContext]
) -> None:
    ladder = Int8Dynamic.from_config({"per_channel": True}).refinements(tiny_decoder, make_ctx())
    assert [(r.description, r.config.nodes_to_exclude[:1]) for r in ladder] == [
        ("lm_head kept fp32", ["/lm_head/MatMul"]),
        ("first and last layers kept fp32", ["/lm_head/MatMul"]),
    ]


def test_refinements_are_cumulative_valid_configs(
    minilm: Encoder, make_ctx: Callable[..., PassContext]
) -> None:
    ladder = Int8Dynamic.from_config({}).refinements(minilm.model, make_ctx())

    assert [r.description for r in ladder] == [
        "per-channel weights",
        "first and last layers kept fp32",  # an encoder has no lm_head: that rung is skipped
    ]
    final = ladder[-1].config
    assert final.per_channel
    assert "/model/encoder/layer.0/attention/self/query/MatMul" in final.nodes_to_exclude
    assert "/model/encoder/layer.5/output/dense/MatMul" in final.nodes_to_exclude
    Int8Dynamic.from_config(final.model_dump())  # a config the registry accepts


def test_bad_config_names_the_field() -> None:
    with pytest.raises(PassError, match=r"op_types.*Gemm"):
        Int8Dynamic.from_config({"op_types": ["Gemm"]})
    with pytest.raises(PassError, match="per_chanel"):
        Int8Dynamic.from_config({"per_chanel": True})


def test_bad_inputs_are_pass_errors(
    tmp_path: Path, make_ctx: Callable[..., PassContext], clean_cwd: Path
) -> None:
    ctx = make_ctx()
    with pytest.raises(PassError, match=r"int8_dynamic: .*cannot read ONNX model"):
        Int8Dynamic.from_config({}).run(corrupt_model(tmp_path / "bad"), ctx)
    with pytest.raises(PassError, match=r"operator com\.example:Foo.*drop the pass"):
        Int8Dynamic.from_config({}).run(custom_op_model(tmp_path / "custom"), ctx)
    assert [p.name for p in ctx.work_dir.iterdir()] == []  # failed steps leave no folder


@pytest.mark.parametrize(
    ("precisions", "tries"),
    [
        (
            ("fp32", "int8"),
            ["as planned", "per-channel weights", "first and last layers kept fp32"],
        ),
        # an INT8-only class cannot run weights left in fp32: that rung is not tried
        (("int8",), ["as planned", "per-channel weights"]),
    ],
)
def test_the_search_skips_refinements_keeping_fp32_where_the_class_runs_none(
    minilm: Encoder,
    make_ctx: Callable[..., PassContext],
    precisions: tuple[str, ...],
    tries: list[str],
) -> None:
    ctx = make_ctx(samples=minilm.samples)
    passes: list[Any] = [create_pass("convert", {}), Int8Dynamic.from_config({})]
    recipe = Recipe(name="int8", passes=[PassSpec(name="convert"), PassSpec(name="int8_dynamic")])
    unreachable = QualityFloors(min_cosine=1.0)  # nothing meets it: every rung is tried

    _best, trail = search(
        passes, recipe, minilm.model, ctx, unreachable, 5, lambda _: None,
        allowed_precisions=precisions,
    )  # fmt: skip

    assert [t.change for t in trail] == tries
    assert [r.keeps_fp32 for r in passes[1].refinements(minilm.model, ctx)] == [False, True]
