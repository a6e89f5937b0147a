"""The runtime layout of a variant (graph + external weights) and the window view of a
generation graph: made once per source file, and the same weights either way."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from slmops.generation.layout import WEIGHTS, ensure_layout
from slmops.generation.windows import unprune, window_session
from slmops.testing.models import tiny_encoder_onnx


def test_weights_move_out_once_per_source_and_again_when_it_changes(tmp_path: Path) -> None:
    source = tmp_path / "variant.onnx"
    source.write_bytes(tiny_encoder_onnx())
    folder = tmp_path / "runtime"

    graph = ensure_layout(source, folder)
    first = (folder / WEIGHTS).stat().st_mtime_ns
    assert graph.stat().st_size < source.stat().st_size  # the weights left the graph
    assert ensure_layout(source, folder) == graph
    assert (folder / WEIGHTS).stat().st_mtime_ns == first  # reused, not rewritten
    os.utime(source, ns=(first + 10**9, first + 10**9))
    ensure_layout(source, folder)
    assert (folder / WEIGHTS).stat().st_mtime_ns != first  # a changed source: laid out again

    ids = np.arange(1, 9, dtype=np.int64)[None]
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    same = [ort.InferenceSession(str(p)).run(None, feed)[0] for p in (source, graph)]
    np.testing.assert_array_equal(same[0], same[1])


def _pruned_lm(tmp_path: Path) -> Path:
    """hidden [b, s, 4] -> Gather(-1, axis 1) -> Unsqueeze -> MatMul -> logits, named as
    onnxruntime-genai's builder names its last-position selection."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["hidden"], name="/model/embed"),
        helper.make_node(
            "Gather", ["hidden", "last"], ["picked"], axis=1, name="/lm_head/prune/Gather"
        ),
        helper.make_node(
            "Unsqueeze", ["picked", "axis1"], ["selected"], name="/lm_head/prune/Unsqueeze"
        ),
        helper.make_node("MatMul", ["selected", "head"], ["logits"], name="/lm_head/MatMul"),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "emb"),
        numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "head"),
        numpy_helper.from_array(np.asarray(-1, dtype=np.int64), "last"),
        numpy_helper.from_array(np.asarray([1], dtype=np.int64), "axis1"),
    ]
    graph = helper.make_graph(
        nodes, "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 1, 16])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "lm.onnx"
    onnx.save(model, str(path))
    return path


def test_the_window_view_gives_every_position_the_served_graph_gives_the_last(
    tmp_path: Path,
) -> None:
    path = _pruned_lm(tmp_path)
    ids = np.asarray([[3, 1, 4, 1, 5]], dtype=np.int64)

    served = ort.InferenceSession(str(path)).run(None, {"input_ids": ids})[0]
    window = window_session(path, ort.SessionOptions(), ["CPUExecutionProvider"])
    every = window.run(None, {"input_ids": ids})[0]

    assert served.shape == (1, 1, 16)
    assert every.shape == (1, 5, 16)
    np.testing.assert_allclose(every[:, -1:], served, rtol=1e-6)
    proto = onnx.load(str(path))
    assert unprune(proto) is True
    assert unprune(proto) is False  # nothing left to bypass
