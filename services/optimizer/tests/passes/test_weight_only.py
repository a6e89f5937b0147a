"""weight_only: MatMulNBits on MiniLM, 4-bit embeddings done safely, the ladder, bad configs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from slmops_optimizer.passes import OnnxModel, PassContext, PassError
from slmops_optimizer.passes.weight_only import WeightOnly

from .conftest import Encoder, corrupt_model


def ops_of(model: OnnxModel) -> Counter[str]:
    return Counter(
        n.op_type for n in onnx.load(str(model.path), load_external_data=False).graph.node
    )


def test_int4_with_embeddings_on_minilm(
    minilm: Encoder, make_ctx: Callable[..., PassContext], clean_cwd: Path
) -> None:
    ctx = make_ctx(minilm.samples)
    out = WeightOnly.from_config(
        {"bits": 4, "block_size": 32, "accuracy_level": 4, "quantize_embeddings": True}
    ).run(minilm.model, ctx)

    ops = ops_of(out)
    assert ops["MatMulNBits"] == 36  # every weight MatMul
    assert ops["MatMul"] == 12  # the activation ones (Q.K, P.V) stay
    assert ops["GatherBlockQuantized"] == 1  # the word table, not position/type
    assert out.size_bytes < 0.2 * minilm.model.size_bytes  # 90 MB -> ~15 MB
    assert any("opset 17 -> 21" in line for line in ctx.log)
    parity = minilm.parity(out)
    assert 0.93 <= parity.cosine_mean < 0.98, parity  # INT4 costs accuracy on MiniLM


def test_int8_blocks_are_near_lossless(
    minilm: Encoder, make_ctx: Callable[..., PassContext]
) -> None:
    out = WeightOnly.from_config({"bits": 8, "block_size": 128}).run(
        minilm.model, make_ctx(minilm.samples)
    )
    assert minilm.parity(out).cosine_min > 0.999


def test_embeddings_of_an_opset17_decoder_with_reducemean(
    tiny_decoder: OnnxModel, make_ctx: Callable[..., PassContext]
) -> None:
    # Quantizing Gather makes ORT's quantizer set opset 21 without converting the graph; a
    # ReduceMean with an "axes" attribute is then invalid (the SmolLM2 failure). Converted first.
    ctx = make_ctx(task="text-generation")
    out = WeightOnly.from_config(
        {"quantize_embeddings": True, "nodes_to_exclude": ["/lm_head/MatMul", "nope"]}
    ).run(tiny_decoder, ctx)

    ops = ops_of(out)
    assert ops["GatherBlockQuantized"] == 1
    assert ops["MatMulNBits"] == 4
    assert ops["MatMul"] == 1  # lm_head kept
    session = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input_ids": np.array([[1, 2, 3]], np.int64)})[0]
    assert logits.shape == (1, 3, 1024)
    assert any("no node named nope" in line for line in ctx.log)


def test_refinement_ladder(tiny_decoder: OnnxModel, make_ctx: Callable[..., PassContext]) -> None:
    planned = WeightOnly.from_config({"bits": 4, "block_size": 32, "quantize_embeddings": True})
    ladder = planned.refinements(tiny_decoder, make_ctx(task="text-generation"))

    assert [r.description for r in ladder] == [
        "asymmetric blocks",
        "block size 16",
        "lm_head kept fp32",
        "first and last layers kept fp32",
        "8-bit weights",
    ]
    final = ladder[-1].config
    assert (final.bits, final.block_size, final.symmetric) == (8, 16, False)
    assert not final.quantize_embeddings
    assert final.nodes_to_exclude == sorted(
        ["/lm_head/MatMul"]
        + [f"/model/layers.{i}/mlp/{p}_proj/MatMul" for i in (0, 1) for p in ("up", "down")]
    )
    assert ladder[2].config.block_size == 16  # cumulative


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"block_size": 48}, "block_size: Value error, must be a power of two"),
        ({"block_size": 8}, "block_size"),
        ({"bits": 3}, "bits"),
        ({"accuracy_level": 5}, "accuracy_level"),
        ({"bits": 8, "quantize_embeddings": True}, "4 bits only"),
    ],
)
def test_bad_config(config: dict[str, object], message: str) -> None:
    with pytest.raises(PassError, match=message):
        WeightOnly.from_config(config)


def test_corrupt_input(tmp_path: Path, make_ctx: Callable[..., PassContext]) -> None:
    ctx = make_ctx()
    with pytest.raises(PassError, match=r"weight_only: cannot read ONNX model model\.onnx"):
        WeightOnly.from_config({}).run(corrupt_model(tmp_path / "bad"), ctx)
    with pytest.raises(PassError, match="needs an ONNX model"):
        WeightOnly.from_config({}).run(None, ctx)
