"""``gguf_blocks`` and the GGUF loader on a tiny synthetic llama (see conftest.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slmops_optimizer.gguf.mapping import Rewriter, pack_exact, pack_rtn
from slmops_optimizer.gguf.reader import split_blocks
from slmops_optimizer.passes import OnnxModel, PassContext, PassError, SourceModel
from slmops_optimizer.passes.gguf_blocks import GgufBlocks

EXACT_TYPES = ["Q4_0", "Q4_1", "Q8_0"]


def _session(path: Path | bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    return np.asarray(
        _session(path).run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    )


def _ids() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, size=(2, 12)).astype(np.int64)


def _context(tmp_path: Path, gguf_path: Path, kind: str = "gguf") -> PassContext:
    source = SourceModel(kind, gguf_path, "text-generation", "sha256:test")  # type: ignore[arg-type]
    return PassContext(work_dir=tmp_path, source=source, intra_op_threads=2)


def _run(tiny: Any, tmp_path: Path, **config: Any) -> tuple[OnnxModel, PassContext]:
    ctx = _context(tmp_path, tiny.gguf)
    out = GgufBlocks.from_config(config).run(OnnxModel(tiny.fp32_onnx), ctx)
    return out, ctx


# -- the mapping, through ONNX Runtime ----------------------------------------------------------


@pytest.mark.parametrize("accuracy_level", [0, 4])
@pytest.mark.parametrize("kind", [*EXACT_TYPES, "RTN4", "RTN8"])
def test_mapped_blocks_reproduce_the_gguf_values_in_onnxruntime(
    kind: str, accuracy_level: int
) -> None:
    """MatMul(eye, W) and Gather(E, all ids) on the rewritten graph give back the dequantized
    GGUF values: nibble order, scales, the Q4_1 offsets and the shared table are right (and
    the fallback's uint8 zero points: RTN4 / RTN8, against their own rounded values)."""
    import gguf
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = 40, 96
    rng = np.random.default_rng(4)
    weights = (0.2 * rng.standard_normal((rows, cols))).astype(np.float32)
    if kind.startswith("RTN"):
        pack = pack_rtn(weights, int(kind[3:]), 32, "Q6_K")
        dense = pack.dequantize()
    else:
        raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[kind])
        dense = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
        pack = pack_exact(split_blocks(raw, kind))

    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    gather = helper.make_node("Gather", ["table", "ids"], ["e"], name="emb", axis=0)
    graph = helper.make_graph(
        [matmul, gather],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", cols]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("e", TensorProto.FLOAT, None),
        ],
        [numpy_helper.from_array(dense.T.copy(), "w"), numpy_helper.from_array(dense, "table")],
    )
    rewriter = Rewriter(graph, accuracy_level)
    nodes = rewriter.matmul(matmul, pack, "w") + rewriter.gather(gather, pack, "w")
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(rewriter.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    ops = Counter(node.op_type for node in graph.node)
    assert ops["GatherBlockQuantized"] == 1
    dense_8bit = pack.bits == 8 and accuracy_level != 4  # dequantized at session load
    assert ops["MatMulNBits"] == (0 if dense_8bit else 1)
    codes = [i for i in graph.initializer if i.name.startswith(("w.q4", "w.q8"))]
    assert len(codes) == 1  # one copy of the codes for the MatMul and the Gather

    ids = np.arange(rows, dtype=np.int64).reshape(2, rows // 2)
    y, e = _session(model.SerializeToString()).run(
        None, {"x": np.eye(cols, dtype=np.float32), "ids": ids}
    )
    np.testing.assert_allclose(y, dense.T, rtol=0, atol=1e-5)  # eye: int8 activations exact
    np.testing.assert_allclose(e.reshape(rows, cols), dense, rtol=0, atol=1e-5)


def test_weights_are_matched_by_content_through_transposes_and_row_permutations(
    tiny_gguf_file: Path, layout: Any
) -> None:
    from slmops_optimizer.gguf.mapping import Candidate, llama_qk_order, match_weights
    from slmops_optimizer.gguf.reader import read_gguf

    file = read_gguf(tiny_gguf_file)
    q = file.tensors["blk.0.attn_q.weight"].dequantize()
    k = file.tensors["blk.1.attn_k.weight"].dequantize()
    k_order = llama_qk_order(k.shape[0], layout.kv_heads)
    shuffled = np.random.default_rng(5).permutation(q.shape[0])
    embedding = file.tensors["token_embd.weight"].dequantize()
    candidates = [
        Candidate("q_t", "matmul", np.ascontiguousarray(q[shuffled].T)),  # exact: row hashing
        # not bit-exact: the llama q/k interleave is tried with a tolerance
        Candidate("k_t", "matmul", np.ascontiguousarray((k[k_order] + 1e-7).T)),
        Candidate("table", "gather", embedding),  # a tied embedding...
        Candidate("head", "matmul", np.ascontiguousarray(embedding.T)),  # ...and its LM head
        Candidate("noise", "matmul", np.ones((layout.hidden, layout.hidden), np.float32)),
    ]
    found = {m.initializer: m for m in match_weights(candidates, file)}
    assert set(found) == {"q_t", "k_t", "table", "head"}
    assert found["q_t"].tensor == "blk.0.attn_q.weight"
    assert np.array_equal(found["q_t"].order, shuffled)
    assert found["k_t"].tensor == "blk.1.attn_k.weight"
    assert np.array_equal(found["k_t"].order, k_order)
    assert found["table"].tensor == found["head"].tensor == "token_embd.weight"
    assert found["table"].order is None
    assert (found["table"].orientation, found["head"].orientation) == ("gather", "matmul")


# -- loader --------------------------------------------------------------------------------------


def test_loader_gives_an_eager_float32_llama_and_the_gguf_tokenizer(tiny: Any) -> None:
    model, tokenizer = tiny.model, tiny.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings
    assert model.config.use_cache is False
    assert model.config._attn_implementation == "eager"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype.is_floating_point
    assert tokenizer("the cat")["input_ids"]


def test_loader_rejects_an_unsupported_architecture(tmp_path: Path, layout: Any) -> None:
    from slmops_optimizer.gguf.loader import load_gguf_causal_lm

    path = layout.write(tmp_path / "bloom.gguf", architecture="bloom")
    with pytest.raises(PassError, match="GGUF architecture 'bloom' is not supported: supported"):
        load_gguf_causal_lm(path)


# -- the pass ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_gguf: Any) -> Any:
    return tiny_gguf


def test_exact_mapping_computes_what_the_fp32_export_computes(
    tiny: Any, tmp_path: Path, layout: Any
) -> None:
    out, ctx = _run(tiny, tmp_path, quantize_fallback=False)
    exact = {n for n, kind in layout.types.items() if kind in {"Q4_0", "Q4_1", "Q8_0"}}
    assert ctx.metrics["mapped_tensors"] == len(exact)
    assert ctx.metrics["fallback_tensors"] == 0
    assert ctx.metrics["fp32_weights"] == 2  # the Q5_1 and Q6_K weights, as asked
    assert ctx.metrics["mapping_max_abs_error"] <= 1e-5
    assert [p.name for p in out.path.parent.iterdir()] == ["model.onnx"]
    reference, mapped = _logits(tiny.fp32_onnx, _ids()), _logits(out.path, _ids())
    np.testing.assert_allclose(mapped, reference, rtol=0, atol=1e-4 * np.abs(reference).max())
    assert any("quantize_fallback=false" in line for line in ctx.log)


def test_default_config_requantizes_what_does_not_map_and_says_so(
    tiny: Any, tmp_path: Path
) -> None:
    import onnx

    out, ctx = _run(tiny, tmp_path)
    assert ctx.metrics["fallback_tensors"] == 2
    assert ctx.metrics["fp32_weights"] == 0
    note = next(line for line in ctx.log if "requantized" in line)
    assert "blk.1.ffn_down.weight (Q6_K)" in note
    assert "blk.1.ffn_up.weight (Q5_1)" in note
    assert "token_embd.weight" in next(line for line in ctx.log if "mapped exactly" in line)

    graph = onnx.load(str(out.path)).graph
    ops = Counter(node.op_type for node in graph.node)
    assert ops["GatherBlockQuantized"] == 1
    # 2 layers x 7 weights + the tied LM head, minus the 8-bit ones (dequantized at load):
    # the Q8_0 attn_v and the two 8-bit fallbacks
    assert ops["MatMulNBits"] == 2 * 7 + 1 - 3
    exported = [  # 2-D weights under the exporter's names: none is left
        i.name
        for i in graph.initializer
        if len(i.dims) == 2 and i.name.startswith(("onnx::MatMul", "inner."))
    ]
    assert exported == []
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and "token_embd" in n.name)
    assert gather.input[0] == head.input[1]  # embedding and LM head read one table
    assert out.size_bytes < OnnxModel(tiny.fp32_onnx).size_bytes / 3

    reference, got = _logits(tiny.fp32_onnx, _ids()), _logits(out.path, _ids())
    assert (reference.argmax(-1) == got.argmax(-1)).mean() >= 0.9
    np.testing.assert_allclose(got, reference, rtol=0, atol=0.05 * np.abs(reference).max())


def test_int8_activations_and_unshared_head(tiny: Any, tmp_path: Path) -> None:
    import onnx

    out, ctx = _run(tiny, tmp_path, accuracy_level=4, share_tied_lm_head=False)
    graph = onnx.load(str(out.path)).graph
    levels = {
        a.i
        for n in graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {4}
    bits = Counter(
        a.i
        for n in graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "bits"
    )
    assert bits[8] == 3  # Q8_0 attn_v and the two 8-bit fallbacks run as 8-bit MatMulNBits
    tables = [i for i in graph.initializer if i.name.startswith("gguf.token_embd.q4")]
    assert len(tables) == 2
    assert not any("one copy" in line for line in ctx.log)
    reference, got = _logits(tiny.fp32_onnx, _ids()), _logits(out.path, _ids())
    np.testing.assert_allclose(got, reference, rtol=0, atol=0.1 * np.abs(reference).max())


def test_a_source_that_is_not_gguf_is_refused(tiny: Any, tmp_path: Path) -> None:
    ctx = _context(tmp_path, tiny.fp32_onnx, kind="onnx")
    with pytest.raises(PassError, match=r"gguf_blocks needs a GGUF source.*weight_only"):
        GgufBlocks.from_config({}).run(OnnxModel(tiny.fp32_onnx), ctx)


def test_a_model_that_is_not_the_export_of_the_file_is_refused(tiny: Any, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.ones((64, 64), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(weight, "w")],
    )
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), other)
    with pytest.raises(PassError, match="is this model the export of that file"):
        GgufBlocks.from_config({}).run(OnnxModel(other), _context(tmp_path, tiny.gguf))


def test_config_is_strict_and_refinements_get_more_conservative(tmp_path: Path) -> None:
    with pytest.raises(PassError, match="fallback_block_size"):
        GgufBlocks.from_config({"fallback_block_size": 48})
    with pytest.raises(PassError, match="invalid config"):
        GgufBlocks.from_config({"bits": 4})
    step = GgufBlocks.from_config({"accuracy_level": 4, "fallback_bits": 4})
    ctx = _context(tmp_path, tmp_path / "x.gguf")
    ladder = step.refinements(OnnxModel(tmp_path / "model.onnx"), ctx)
    assert [r.description for r in ladder] == [
        "accuracy_level 0 (fp32 activations)",
        "8-bit fallback",
        "fallback weights kept fp32",
    ]
    last = ladder[-1].config
    assert (last.accuracy_level, last.fallback_bits, last.quantize_fallback) == (0, 8, False)
    default = GgufBlocks.from_config({})
    assert [r.description for r in default.refinements(OnnxModel(tmp_path / "m"), ctx)] == [
        "fallback weights kept fp32"
    ]
