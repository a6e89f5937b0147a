"""Every GGUF block type in every form, against the ``gguf`` package's own dequantization: as
numpy packs, then through ONNX Runtime (MatMulNBits / GatherBlockQuantized), one tensor or a
packed qkv of several, or a row range of one; and matching weights to GGUF tensors by content,
whole, in segments or as row ranges (no torch)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

from slmops_optimizer.gguf.blocks import TYPE_SIZES, split_blocks
from slmops_optimizer.gguf.mapping import WeightPack, pack_blocks, pack_rtn
from slmops_optimizer.gguf.rewrite import Rewriter

NARROW = ["Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K"]  # codes of at most 4 bits: int4
WIDE = ["Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]
CASES = [(kind, "int4") for kind in NARROW] + [
    (kind, form) for kind in WIDE for form in ("split4", "int8", "dense")
]
#: c = o + e * s: e per (type, form); only Q4_1 / Q4_K (offset + 8 s) round.
SHIFTS = {("Q4_1", "int4"): 8, ("Q4_K", "int4"): 8, ("Q8_0", "split4"): 8}
ROUNDING = {("Q4_1", "int4"), ("Q4_K", "int4")}


def _reference(raw: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]))


def _raw(layout: Any, kind: str, rows: int = 40, cols: int = 512, seed: int = 4) -> np.ndarray:
    return np.asarray(layout.random_blocks(kind, rows, cols, np.random.default_rng(seed), 0.2))


def test_every_mappable_type_is_covered() -> None:
    assert {kind for kind, _ in CASES} == set(TYPE_SIZES)


@pytest.mark.parametrize(("kind", "form"), CASES)
def test_packs_hold_the_file_values(kind: str, form: Any, layout: Any) -> None:
    """Codes shifted into the container, default zero point, the correction c = o + e s:
    the weights are the file's, to the bit except where c rounds (within the derived bound)."""
    raw = _raw(layout, kind)
    blocks = split_blocks(raw, kind)
    pack = pack_blocks(blocks, form)
    expected = _reference(raw, kind)
    assert pack.exact
    assert pack.zero_points is None
    assert pack.bits == (8 if form in ("int8", "dense") else 4)
    assert len(pack.planes) == (2 if form == "split4" else 1)
    assert pack.block_size == blocks.block_size
    assert pack.shift == SHIFTS.get((kind, form), 0)
    assert pack.rounds == ((kind, form) in ROUNDING)
    error = np.abs(pack.dequantize() - expected)
    bound = pack.rounding_bound()
    assert (bound > 0) == ((kind, form) in ROUNDING)
    assert float(error.max()) <= bound
    if bound:  # per element: at most 2**-24 (|c| + 2|w|)
        correction = np.repeat(pack.correction(), pack.block_size, axis=1)
        assert np.all(error <= 2.0**-24 * (np.abs(correction) + 2 * np.abs(expected)) + 1e-30)
    if form == "split4":  # both planes are 4-bit codes whose 16 h + l is the shifted code
        assert all(p.shape == (40, pack.n_blocks, pack.block_size // 2) for p in pack.planes)
        shifted = pack.codes().astype(np.int32) - blocks.codes
        assert len(np.unique(shifted)) == 1


def _session(model: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _rewrite(
    packs: list[WeightPack], accuracy_level: int | None, tables: bool = True
) -> tuple[Any, Counter[str]]:
    """A graph ``y = x @ W`` (W: the packs' rows, concatenated) and, with ``tables``,
    ``e = E[ids]`` on the first pack, rewritten: (the ONNX model, its op counts)."""
    from onnx import TensorProto, helper, numpy_helper

    dense = np.concatenate([p.dequantize() for p in packs])
    k = packs[0].k
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    nodes = [matmul]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    initializers = [numpy_helper.from_array(np.ascontiguousarray(dense.T), "w")]
    if tables:
        nodes.append(helper.make_node("Gather", ["table", "ids"], ["e"], name="emb", axis=0))
        outputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, None))
        initializers.append(numpy_helper.from_array(packs[0].dequantize(), "table"))
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
        ],
        outputs,
        initializers,
    )
    rewriter = Rewriter(graph, accuracy_level)
    bases = [f"w{i}" for i in range(len(packs))]
    new_nodes = rewriter.matmul(matmul, packs, bases)
    if tables:
        new_nodes += rewriter.gather(nodes[1], packs[0], bases[0])
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(rewriter.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    return model, Counter(node.op_type for node in graph.node)


@pytest.mark.parametrize("accuracy_level", [0, 4])
@pytest.mark.parametrize(("kind", "form"), [*CASES, ("RTN4", "int4"), ("RTN8", "int8")])
def test_mapped_blocks_reproduce_the_gguf_values_in_onnxruntime(
    kind: str, form: Any, accuracy_level: int, layout: Any
) -> None:
    """MatMul(eye, W) and Gather(E, all ids) on the rewritten graph give back the file's
    values: code layout, shifts, scales (float16 x integers, multiplied in the graph), the
    correction and the one shared copy of the codes (and the fallback's uint8 zero points:
    RTN4 / RTN8, against their own rounded values)."""
    rows, cols = 40, 512
    if kind.startswith("RTN"):
        weights = (0.2 * np.random.default_rng(4).standard_normal((rows, cols))).astype(np.float32)
        pack = pack_rtn(weights, int(kind[3:]), 32, "IQ4_XS")
        expected = pack.dequantize()
    else:
        raw = _raw(layout, kind, rows, cols)
        pack = pack_blocks(split_blocks(raw, kind), form)
        expected = _reference(raw, kind)
    model, ops = _rewrite([pack], accuracy_level)
    assert ops["GatherBlockQuantized"] == len(pack.planes)
    assert ops["MatMulNBits"] == (0 if form == "dense" else len(pack.planes))
    levels = {
        a.i
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels <= {4 if form == "int8" else accuracy_level}
    codes = [i for i in model.graph.initializer if i.name.startswith("w0.q")]
    assert len(codes) == len(pack.planes)  # one copy of the codes for the MatMul and Gather
    assert all(i.data_type == 2 for i in codes)  # uint8

    ids = np.arange(rows, dtype=np.int64).reshape(2, rows // 2)
    y, e = _session(model).run(None, {"x": np.eye(cols, dtype=np.float32), "ids": ids})
    scale = float(np.abs(expected).max())
    int8_activations = (accuracy_level == 4 and form != "dense") or form == "int8"
    tolerance = 1e-6 * scale if int8_activations else pack.rounding_bound() + 1e-7 * scale
    np.testing.assert_allclose(y, expected.T, rtol=0, atol=tolerance)
    np.testing.assert_allclose(e.reshape(rows, cols), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("wide", ["split4", "int8", "dense"])
@pytest.mark.parametrize(
    "kinds",
    [("Q4_K", "Q4_K", "Q6_K"), ("Q5_0", "Q5_0", "Q8_0"), ("Q5_1", "Q4_0", "Q5_K")],
    ids=["q4k-q4k-q6k", "q50-q50-q80", "q51-q40-q5k"],
)
def test_a_packed_qkv_weight_runs_as_one_node_per_run_of_equal_packs(
    kinds: tuple[str, ...], wide: Any, layout: Any
) -> None:
    """Segments of one MatMul weight: consecutive packs with the same form, bits and block
    size share one MatMulNBits (codes concatenated along N, scales and corrections by a Concat
    folded at load); different runs are concatenated on the last axis."""
    from slmops_optimizer.gguf.mapping import form_for

    packs, expected = [], []
    for i, (kind, rows) in enumerate(zip(kinds, (64, 32, 32), strict=True)):
        raw = _raw(layout, kind, rows, 512, seed=10 + i)
        blocks = split_blocks(raw, kind)
        packs.append(pack_blocks(blocks, form_for(blocks, wide)))
        expected.append(_reference(raw, kind))
    model, ops = _rewrite(packs, 0, tables=False)
    keys = [(p.form, p.bits, p.block_size) for p in packs]
    firsts = [p for i, p in enumerate(packs) if i == 0 or keys[i - 1] != keys[i]]
    assert ops["MatMulNBits"] == sum(len(p.planes) for p in firsts if p.form != "dense")
    outputs = [n for n in model.graph.node if "y" in n.output]
    assert [n.op_type for n in outputs] == ["Concat" if len(firsts) > 1 else outputs[0].op_type]
    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    (y,) = _session(model).run(None, {"x": x, "ids": np.zeros((1, 1), np.int64)})
    reference = x.astype(np.float64) @ np.concatenate(expected).T.astype(np.float64)
    int8 = any(p.form == "int8" for p in packs)
    tolerance = (2e-2 if int8 else 1e-5) * float(np.abs(reference).max())
    np.testing.assert_allclose(y, reference, rtol=0, atol=tolerance)


def test_weights_are_matched_by_content_whole_or_in_segments(
    tiny_gguf_file: Any, layout: Any
) -> None:
    """Through transposes, row permutations (llama's q/k interleave) and a packed qkv weight
    whose column segments are q, k and v."""
    from slmops_optimizer.gguf.matching import Candidate, llama_qk_order, match_weights
    from slmops_optimizer.gguf.reader import read_gguf

    file = read_gguf(tiny_gguf_file)

    def dense(name: str) -> np.ndarray:
        return np.asarray(file.tensors[name].dequantize())

    q, k, v = (dense(f"blk.1.attn_{x}.weight") for x in "qkv")
    q_order = llama_qk_order(q.shape[0], layout.heads)
    k_order = llama_qk_order(k.shape[0], layout.kv_heads)
    qkv = np.concatenate([q[q_order], k[k_order], v])  # the builder's qkv_proj, as [N, K]
    up = dense("blk.0.ffn_up.weight")
    shuffled = np.random.default_rng(5).permutation(up.shape[0])
    k0 = dense("blk.0.attn_k.weight")
    embedding = dense("token_embd.weight")
    candidates = [
        Candidate("qkv_t", "matmul", np.ascontiguousarray(qkv.T)),
        Candidate("up_t", "matmul", np.ascontiguousarray(up[shuffled].T)),  # row hashing
        # not bit-exact: the llama q/k interleave is tried with a tolerance
        Candidate("k0_t", "matmul", np.ascontiguousarray((k0[k_order] + 1e-7).T)),
        Candidate("table", "gather", embedding),  # a tied embedding...
        Candidate("head", "matmul", np.ascontiguousarray(embedding.T)),  # ...and its LM head
        Candidate("noise", "matmul", np.ones((layout.hidden, 3 * layout.hidden), np.float32)),
    ]
    found: dict[str, list[Any]] = {}
    for match in match_weights(candidates, file):
        found.setdefault(match.initializer, []).append(match)
    assert set(found) == {"qkv_t", "up_t", "k0_t", "table", "head"}
    segments = sorted(found["qkv_t"], key=lambda m: m.segment)
    assert [m.tensor for m in segments] == [f"blk.1.attn_{x}.weight" for x in "qkv"]
    assert [m.segment for m in segments] == [(0, 256), (256, 384), (384, 512)]
    assert np.array_equal(segments[0].order, q_order)
    assert np.array_equal(segments[1].order, k_order)
    assert segments[2].order is None
    assert [m.tensor for m in found["up_t"]] == ["blk.0.ffn_up.weight"]
    assert np.array_equal(found["up_t"][0].order, shuffled)
    assert [m.tensor for m in found["k0_t"]] == ["blk.0.attn_k.weight"]
    assert np.array_equal(found["k0_t"][0].order, k_order)
    assert found["table"][0].tensor == found["head"][0].tensor == "token_embd.weight"
    assert (found["table"][0].orientation, found["head"][0].orientation) == ("gather", "matmul")
    assert all(m.segment is None for name in ("up_t", "table", "head") for m in found[name])


def test_a_weight_holding_a_row_range_of_a_tensor_is_matched_to_that_range(
    tiny_gguf_file: Any, layout: Any
) -> None:
    """phi3's fused ffn_up (gate rows, then up rows), split by the builder into two weights:
    each is a row range of the one tensor. A range is found wherever it starts, in order or
    permuted within it; one shaped like other tensors (attn_q, attn_output, token_embd are
    [256, 256] too) or as wide as another tensor of the same shape (the other layer's ffn_down)
    is not taken for them; nor is a range whose sums agree but whose rows do not (two values
    swapped) or one that runs across two tensors; a whole tensor still matches whole."""
    from slmops_optimizer.gguf.matching import Candidate, match_weights
    from slmops_optimizer.gguf.reader import read_gguf

    file = read_gguf(tiny_gguf_file)

    def dense(name: str) -> np.ndarray:
        return np.asarray(file.tensors[name].dequantize())

    up = dense("blk.0.ffn_up.weight")  # [512, 256] Q4_1: gate rows then up rows, as in phi3
    gate = dense("blk.1.ffn_gate.weight")  # [512, 256] Q2_K
    down = dense("blk.1.ffn_down.weight")  # [256, 512]: blk.0.ffn_down has the same shape
    shuffled = np.random.default_rng(7).permutation(128)
    almost = up[128:384].copy()  # two values of a row swapped: the same sums, other rows
    column = int(np.flatnonzero(almost[5] != almost[5, 0])[0])
    almost[5, [0, column]] = almost[5, [column, 0]]
    across = np.concatenate([up[448:], gate[:64]])  # the end of one tensor, the start of another

    def matmul(name: str, rows: np.ndarray) -> Candidate:
        return Candidate(name, "matmul", np.ascontiguousarray(rows.T))

    candidates = [
        matmul("gate_t", up[:256]),
        matmul("up_t", up[256:]),
        Candidate("middle", "gather", np.ascontiguousarray(gate[100:356])),  # unaligned start
        matmul("shuffled_t", gate[200:328][shuffled]),
        matmul("down_rows_t", down[64:192]),
        matmul("whole_t", dense("blk.0.attn_output.weight")),
        matmul("almost_t", almost),
        matmul("across_t", across),
    ]
    found = {m.initializer: m for m in match_weights(candidates, file)}
    assert set(found) == {"gate_t", "up_t", "middle", "shuffled_t", "down_rows_t", "whole_t"}
    expected = {
        "gate_t": ("blk.0.ffn_up.weight", (0, 256)),
        "up_t": ("blk.0.ffn_up.weight", (256, 512)),
        "middle": ("blk.1.ffn_gate.weight", (100, 356)),
        "shuffled_t": ("blk.1.ffn_gate.weight", (200, 328)),
        "down_rows_t": ("blk.1.ffn_down.weight", (64, 192)),
        "whole_t": ("blk.0.attn_output.weight", None),
    }
    for name, (tensor, rows) in expected.items():
        match = found[name]
        assert (match.tensor, match.tensor_rows, match.segment) == (tensor, rows, None), name
        if rows is None:
            assert match.order is None
        elif name == "shuffled_t":
            assert np.array_equal(match.order, 200 + shuffled)
        else:
            assert np.array_equal(match.order, np.arange(*rows))
    assert found["middle"].orientation == "gather"
    assert found["gate_t"].order_key != found["up_t"].order_key  # two packs of one tensor


@pytest.mark.parametrize(
    ("kind", "form"), [("Q4_K", "int4"), ("Q4_1", "int4"), ("Q6_K", "split4"), ("Q5_0", "int8")]
)
def test_a_row_range_of_blocks_reproduces_those_rows_in_onnxruntime(
    kind: str, form: Any, layout: Any
) -> None:
    """The blocks of rows [13, 29) of a tensor (what a weight holding that row range gets:
    GGUF blocks run along K, so a row range of blocks is exact) give back exactly those rows
    through MatMulNBits and GatherBlockQuantized, offsets and corrections included."""
    rows, cols, start, stop = 40, 512, 13, 29
    raw = _raw(layout, kind, rows, cols)
    blocks = split_blocks(raw, kind).permute_rows(np.arange(start, stop))
    pack = pack_blocks(blocks, form)
    expected = _reference(raw, kind)[start:stop]
    assert (pack.n, pack.k) == (stop - start, cols)
    np.testing.assert_allclose(pack.dequantize(), expected, rtol=0, atol=pack.rounding_bound())
    model, _ = _rewrite([pack], 0)
    ids = np.arange(stop - start, dtype=np.int64).reshape(1, -1)
    y, e = _session(model).run(None, {"x": np.eye(cols, dtype=np.float32), "ids": ids})
    scale = float(np.abs(expected).max())
    tolerance = 1e-6 * scale if form == "int8" else pack.rounding_bound() + 1e-7 * scale
    np.testing.assert_allclose(y, expected.T, rtol=0, atol=tolerance)
    np.testing.assert_allclose(e.reshape(stop - start, cols), expected, rtol=0, atol=tolerance)
