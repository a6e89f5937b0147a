"""graph_optimize: lossless fusions on MiniLM, portable 'basic' output, decoders, bad inputs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from slmops_optimizer.passes import OnnxModel, PassContext, PassError
from slmops_optimizer.passes.graph_optimize import GraphOptimize

from .conftest import Encoder, Optimized, corrupt_model, custom_op_model


def op_counts(model: OnnxModel) -> Counter[str]:
    graph = onnx.load(str(model.path), load_external_data=False).graph
    return Counter(f"{node.domain or 'ai.onnx'}:{node.op_type}" for node in graph.node)


def test_extended_fuses_bert_attention_and_keeps_outputs(
    minilm: Encoder, minilm_fused: Optimized
) -> None:
    out, ctx = minilm_fused.model, minilm_fused.ctx

    ops = op_counts(out)
    assert ops["com.microsoft:Attention"] == 6  # heads found in the graph: 384 / 32
    assert ops["com.microsoft:SkipLayerNormalization"] >= 6
    assert sum(ops.values()) < sum(op_counts(minilm.model).values()) / 3
    assert ctx.metrics["graph_optimize_max_abs_diff"] < 1e-3
    assert minilm.parity(out).cosine_min > 0.99999
    assert any("heads 12, hidden 384" in line for line in ctx.log)
    assert not (ctx.work_dir / ".tmp").exists()
    assert sorted(p.name for p in minilm.model.path.parent.iterdir()) == ["model.onnx"]


def test_basic_level_keeps_standard_onnx_ops(
    minilm: Encoder, make_ctx: Callable[..., PassContext]
) -> None:
    ctx = make_ctx(minilm.samples)
    out = GraphOptimize.from_config({"level": "basic", "transformer_fusion": False}).run(
        minilm.model, ctx
    )

    assert {op.split(":")[0] for op in op_counts(out)} == {"ai.onnx"}
    assert sum(op_counts(out).values()) < sum(op_counts(minilm.model).values())


def test_decoder_skips_fusion_under_auto(
    tiny_decoder: OnnxModel, make_ctx: Callable[..., PassContext]
) -> None:
    ctx = make_ctx(task="text-generation")  # no samples: synthetic token ids
    out = GraphOptimize.from_config({}).run(tiny_decoder, ctx)

    assert out.size_bytes > 0
    assert any("transformer fusion skipped" in line for line in ctx.log)
    assert ctx.metrics["graph_optimize_max_abs_diff"] < 1e-4


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num_heads": 12}, "num_heads and hidden_size"),
        ({"num_heads": 5, "hidden_size": 384}, "not a multiple of num_heads"),
        ({"level": "layout"}, "level"),
        ({"transformer_fusion": False, "model_type": "bert"}, "needs transformer_fusion"),
    ],
)
def test_bad_config(config: dict[str, object], message: str) -> None:
    with pytest.raises(PassError, match=message):
        GraphOptimize.from_config(config)


def test_bad_inputs(tmp_path: Path, make_ctx: Callable[..., PassContext], clean_cwd: Path) -> None:
    ctx = make_ctx()
    with pytest.raises(PassError, match="cannot read ONNX model"):
        GraphOptimize.from_config({}).run(corrupt_model(tmp_path / "corrupt"), ctx)
    with pytest.raises(PassError, match=r"operator com\.example:Foo"):
        GraphOptimize.from_config({}).run(custom_op_model(tmp_path / "custom"), ctx)
    assert [p.name for p in ctx.work_dir.iterdir()] == []
