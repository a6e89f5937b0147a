"""fp16: half-size MiniLM with fp32 I/O, after graph_optimize's fused ops too, bad inputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from slmops_optimizer.passes import OnnxModel, PassContext, PassError
from slmops_optimizer.passes.fp16 import Fp16

from .conftest import Encoder, Optimized, custom_op_model


def io_types(model: OnnxModel) -> set[int]:
    graph = onnx.load(str(model.path), load_external_data=False).graph
    return {v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}


def test_fused_graph_to_fp16_keeps_fp32_io(
    minilm: Encoder, minilm_fused: Optimized, make_ctx: Callable[..., PassContext], clean_cwd: Path
) -> None:
    # The jetson-orin-gpu recipe: graph_optimize then fp16 on the fused contrib ops.
    ctx = make_ctx(minilm.samples)
    out = Fp16.from_config({"keep_io_types": True}).run(minilm_fused.model, ctx)

    assert 0.45 < out.size_bytes / minilm.model.size_bytes < 0.55
    assert io_types(out) == {onnx.TensorProto.INT64, onnx.TensorProto.FLOAT}
    parity = minilm.parity(out)
    assert parity.cosine_min > 0.999, parity
    assert [p.name for p in ctx.work_dir.iterdir()] == ["01-fp16"]


def test_fp16_io_without_keep_io_types(
    tiny_decoder: OnnxModel, make_ctx: Callable[..., PassContext]
) -> None:
    ctx = make_ctx(task="text-generation")
    out = Fp16.from_config({"keep_io_types": False, "op_block_list": ["ReduceMean"]}).run(
        tiny_decoder, ctx
    )
    assert io_types(out) == {onnx.TensorProto.INT64, onnx.TensorProto.FLOAT16}
    assert out.size_bytes < 0.55 * tiny_decoder.size_bytes
    graph = onnx.load(str(out.path)).graph
    assert sum(n.op_type == "Cast" for n in graph.node) >= 2  # around the blocked ReduceMeans


def test_bad_config_and_input(tmp_path: Path, make_ctx: Callable[..., PassContext]) -> None:
    with pytest.raises(PassError, match="keep_io_type"):
        Fp16.from_config({"keep_io_type": True})
    with pytest.raises(PassError, match=r"fp16: ONNX Runtime rejects the model: operator com"):
        Fp16.from_config({}).run(custom_op_model(tmp_path / "custom"), make_ctx())
