"""``gguf_blocks`` and the GGUF loader on a tiny synthetic llama (see conftest.py), end to end:
on the TorchScript export and on onnxruntime-genai's builder graph of the same file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slmops_optimizer.passes import OnnxModel, PassContext, PassError, SourceModel
from slmops_optimizer.passes.gguf_blocks import GgufBlocks


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


def _ops(path: Path) -> Counter[str]:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _attrs(path: Path, op: str, name: str) -> Counter[int]:
    import onnx

    return Counter(
        a.i
        for n in onnx.load(str(path)).graph.node
        if n.op_type == op
        for a in n.attribute
        if a.name == name
    )


def test_exact_mapping_computes_what_the_fp32_export_computes(
    tiny: Any, tmp_path: Path, layout: Any
) -> None:
    out, ctx = _run(tiny, tmp_path, quantize_fallback=False)
    mapped = {n for n, kind in layout.types.items() if kind in layout.mapped}
    assert ctx.metrics["mapped_tensors"] == len(mapped) == 14
    assert ctx.metrics["fallback_tensors"] == 0
    assert ctx.metrics["fp32_weights"] == 1  # the F16 weight, as asked
    assert ctx.metrics["mapping_max_abs_error"] <= 1e-6
    assert [p.name for p in out.path.parent.iterdir()] == ["model.onnx"]
    reference, mapped_logits = _logits(tiny.fp32_onnx, _ids()), _logits(out.path, _ids())
    scale = np.abs(reference).max()
    np.testing.assert_allclose(mapped_logits, reference, rtol=0, atol=1e-5 * scale)
    assert any("quantize_fallback=false" in line for line in ctx.log)


def test_default_config_maps_every_block_type_and_records_the_tensor_map(
    tiny: Any, tmp_path: Path, layout: Any
) -> None:
    import onnx

    out, ctx = _run(tiny, tmp_path)
    assert ctx.metrics["fallback_tensors"] == 1
    assert ctx.metrics["fp32_weights"] == 0
    assert "blk.1.ffn_up.weight (F16)" in next(line for line in ctx.log if "requantized" in line)
    mapped_note = next(line for line in ctx.log if "mapped exactly" in line)
    assert "Q6_K x2" in mapped_note
    assert "token_embd.weight" in mapped_note

    entries = {e["tensor"]: e for e in ctx.details["tensor_map"]}
    assert json.loads(json.dumps(ctx.details["tensor_map"])) == ctx.details["tensor_map"]
    assert set(entries) == set(layout.types)
    for name, kind in layout.types.items():
        entry = entries[name]
        assert entry["type"] == kind
        if kind == "F16":
            assert (entry["form"], entry["container"], entry["bits"]) == ("rtn", "dense", 8)
            continue
        wide = kind in {"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"}
        assert entry["form"] == ("split4" if wide else "int4")
        assert (entry["bits"], entry["planes"]) == (4, 2 if wide else 1)
        assert entry["block_size"] == (16 if kind in {"Q2_K", "Q3_K", "Q6_K"} else 32)
        assert entry["max_abs_error"] <= entry["error_bound"]
        assert (entry["error_bound"] > 0) == (kind in {"Q4_1", "Q4_K"})
        assert entry["uses"] == (
            ["gather", "matmul"] if name == "token_embd.weight" else ["matmul"]
        )

    ops = _ops(out.path)
    assert ops["GatherBlockQuantized"] == 2  # the Q6_K table's two planes
    # 2 layers x 7 weights + the tied LM head: 7 int4 tensors (one node), 7 split4 (two), and
    # the F16 fallback expanded to fp32 at load (8-bit, accuracy_level 0)
    assert ops["MatMulNBits"] == 7 + 2 * 7
    graph = onnx.load(str(out.path)).graph
    exported = [  # 2-D weights under the exporter's names: none is left
        i.name
        for i in graph.initializer
        if len(i.dims) == 2 and i.name.startswith(("onnx::MatMul", "inner."))
    ]
    assert exported == []
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    heads = [n for n in graph.node if n.op_type == "MatMulNBits" and "token_embd" in n.name]
    assert sorted(g.input[0] for g in gathers) == sorted(h.input[1] for h in heads)  # one copy
    assert out.size_bytes < OnnxModel(tiny.fp32_onnx).size_bytes / 3

    reference, got = _logits(tiny.fp32_onnx, _ids()), _logits(out.path, _ids())
    assert (reference.argmax(-1) == got.argmax(-1)).mean() >= 0.9
    np.testing.assert_allclose(got, reference, rtol=0, atol=0.05 * np.abs(reference).max())


def test_int8_activations_and_unshared_head(tiny: Any, tmp_path: Path) -> None:
    out, ctx = _run(tiny, tmp_path, accuracy_level=4, wide_codes="int8", share_tied_lm_head=False)
    assert set(_attrs(out.path, "MatMulNBits", "accuracy_level")) == {4}
    # 8-bit: the six wide tensors, the LM head and the F16 fallback
    assert _attrs(out.path, "MatMulNBits", "bits") == Counter({4: 7, 8: 8})
    assert _attrs(out.path, "GatherBlockQuantized", "bits") == Counter({8: 1})
    import onnx

    graph = onnx.load(str(out.path)).graph
    tables = [i for i in graph.initializer if i.name.startswith("gguf.token_embd.q8")]
    assert len(tables) == 2
    assert not any("one copy" in line for line in ctx.log)
    entries = [e for e in ctx.details["tensor_map"] if e["tensor"] == "token_embd.weight"]
    assert sorted(e["uses"][0] for e in entries) == ["gather", "matmul"]
    reference, got = _logits(tiny.fp32_onnx, _ids()), _logits(out.path, _ids())
    np.testing.assert_allclose(got, reference, rtol=0, atol=0.1 * np.abs(reference).max())


# -- onnxruntime-genai's builder graph -------------------------------------------------------------


def _builder_logits(path: Path, ids: np.ndarray, builder_dir: Path) -> np.ndarray:
    """All positions' logits of a generation graph, its past keys and values empty."""
    import onnxruntime as ort

    from slmops.generation.windows import window_session

    config = json.loads((builder_dir / "genai_config.json").read_text())["model"]["decoder"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = window_session(path, options, ["CPUExecutionProvider"])
    feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values"):
            shape = (ids.shape[0], config["num_key_value_heads"], 0, config["head_size"])
            feed[spec.name] = np.zeros(shape, dtype=np.float32)
    return np.asarray(session.run(["logits"], feed)[0])


@pytest.mark.parametrize("wide_codes", ["split4", "int8", "dense"])
def test_builder_graph_packed_qkv_and_tied_transpose_gather_map_exactly(
    wide_codes: str, tiny_gguf_file: Path, tiny_builder: Path, tmp_path: Path, layout: Any
) -> None:
    """The builder's qkv_proj (q, k, v of mixed types in one weight) is matched segment by
    segment; its tied embedding ``Gather(Transpose(lm_head))`` reads the LM head's codes; the
    mapped model computes what the fp32 graph does (int8: with int8 activations)."""
    import onnx

    ctx = _context(tmp_path, tiny_gguf_file)
    config = {"wide_codes": wide_codes, "quantize_fallback": False}
    out = GgufBlocks.from_config(config).run(OnnxModel(tiny_builder), ctx)
    assert ctx.metrics["mapped_tensors"] == 14
    assert ctx.metrics["fp32_weights"] == 1  # the F16 up_proj
    entries = {e["tensor"]: e for e in ctx.details["tensor_map"]}
    assert entries["token_embd.weight"]["uses"] == ["gather", "matmul"]
    assert all(entries[f"blk.{i}.attn_{x}.weight"] for i in (0, 1) for x in "qkv")

    graph = onnx.load(str(out.path)).graph
    assert not any(n.name == "/model/embed_tokens/Transpose" for n in graph.node)
    fp32_weights = [i.name for i in graph.initializer if i.name.endswith("MatMul.weight")]
    assert fp32_weights == ["model.layers.1.mlp.up_proj.MatMul.weight"]  # F16, kept
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    readers = {n.input[1] for n in graph.node if n.op_type == "MatMulNBits"}
    readers |= {n.input[0] for n in graph.node if n.op_type == "Cast"}  # dense: expanded
    assert gathers
    assert all(g.input[0] in readers for g in gathers)
    # layer 1's q, k (Q5_0) and v (Q8_0) share one form: one node (pair) over the three
    merged = [n for n in graph.node if n.name.startswith("gguf.blk.1.attn_q+attn_k+attn_v")]
    assert merged

    ids = np.random.default_rng(3).integers(0, layout.vocab, size=(1, 24)).astype(np.int64)
    reference = _builder_logits(tiny_builder, ids, tiny_builder.parent)
    got = _builder_logits(out.path, ids, tiny_builder.parent)
    scale = float(np.abs(reference).max())
    if wide_codes == "int8":
        assert (reference.argmax(-1) == got.argmax(-1)).mean() >= 0.9
        np.testing.assert_allclose(got, reference, rtol=0, atol=0.05 * scale)
    else:
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5 * scale)


def test_builder_graph_without_embeddings_keeps_the_transposed_table(
    tiny_gguf_file: Path, tiny_builder: Path, tmp_path: Path
) -> None:
    """embeddings=false: the LM head is mapped, the Gather keeps reading the fp32 table through
    the builder's Transpose (which therefore stays)."""
    import onnx

    ctx = _context(tmp_path, tiny_gguf_file)
    out = GgufBlocks.from_config({"embeddings": False}).run(OnnxModel(tiny_builder), ctx)
    graph = onnx.load(str(out.path)).graph
    assert any(n.name == "/model/embed_tokens/Transpose" for n in graph.node)
    assert any(i.name == "lm_head.MatMul.weight" for i in graph.initializer)
    assert not any(n.op_type == "GatherBlockQuantized" for n in graph.node)
    assert any(n.op_type == "MatMulNBits" and "token_embd" in n.name for n in graph.node)
    assert any("embeddings=false" in line for line in ctx.log)
    ids = np.arange(3, 19, dtype=np.int64).reshape(1, 16)
    reference = _builder_logits(tiny_builder, ids, tiny_builder.parent)
    got = _builder_logits(out.path, ids, tiny_builder.parent)
    assert (reference.argmax(-1) == got.argmax(-1)).mean() >= 0.9


def test_a_fused_tensor_split_into_two_matmuls_maps_as_two_row_ranges(
    tiny_gguf_file: Path, tmp_path: Path
) -> None:
    """phi3's gate_up as the builder writes it: one GGUF tensor (here blk.0.ffn_up, Q4_1),
    its first half the gate MatMul's weight, its second the up MatMul's. Each becomes a
    MatMulNBits on its own rows' blocks, exactly; together they store the tensor once."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from slmops_optimizer.gguf.reader import read_gguf

    file = read_gguf(tiny_gguf_file)
    table = file.tensors["token_embd.weight"].dequantize()
    fused = file.tensors["blk.0.ffn_up.weight"].dequantize()
    half = fused.shape[0] // 2
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["x"], name="embed", axis=0),
        helper.make_node("MatMul", ["x", "gate_w"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["x", "up_w"], ["up"], name="up_proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "gate_up",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("gate", "up")],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.ascontiguousarray(fused[:half].T), "gate_w"),
            numpy_helper.from_array(np.ascontiguousarray(fused[half:].T), "up_w"),
        ],
    )
    source = tmp_path / "gate_up.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)

    ctx = _context(tmp_path, tiny_gguf_file)
    out = GgufBlocks.from_config({}).run(OnnxModel(source), ctx)
    assert ctx.metrics["fp32_weights"] == 0
    assert ctx.metrics["mapping_max_abs_error"] <= 1e-6
    halves = [e for e in ctx.details["tensor_map"] if e["tensor"] == "blk.0.ffn_up.weight"]
    assert [e["shape"] for e in halves] == [[half, fused.shape[1]]] * 2
    assert all(e["form"] == "int4" for e in halves)
    mapped = onnx.load(str(out.path)).graph
    assert _ops(out.path)["MatMulNBits"] == 2
    codes = [i for i in mapped.initializer if i.name.startswith("gguf.blk.0.ffn_up.q4")]
    assert sum(int(np.prod(i.dims)) for i in codes) == fused.size // 2  # 4-bit: the tensor once

    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    reference = _session(source).run(None, {"input_ids": ids})
    got = _session(out.path).run(None, {"input_ids": ids})
    for expected, actual in zip(reference, got, strict=True):
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * scale)


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
    with pytest.raises(PassError, match="wide_codes"):
        GgufBlocks.from_config({"wide_codes": "int5"})
    step = GgufBlocks.from_config({"accuracy_level": 4, "wide_codes": "int8", "fallback_bits": 4})
    ctx = _context(tmp_path, tmp_path / "x.gguf")
    ladder = step.refinements(OnnxModel(tmp_path / "model.onnx"), ctx)
    assert [r.description for r in ladder] == [
        "accuracy_level 0 (fp32 activations)",
        "wide codes split4 (fp32 activations)",
        "8-bit fallback",
        "fallback weights kept fp32",
    ]
    last = ladder[-1].config
    assert (last.accuracy_level, last.wide_codes) == (0, "split4")
    assert (last.fallback_bits, last.quantize_fallback) == (8, False)
    default = GgufBlocks.from_config({})
    assert [r.description for r in default.refinements(OnnxModel(tmp_path / "m"), ctx)] == [
        "fallback weights kept fp32"
    ]
