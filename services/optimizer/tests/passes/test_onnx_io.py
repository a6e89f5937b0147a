"""The shared helpers: sensitive nodes, the quantizer sandbox, error wording, refinement ladders."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from slmops_optimizer.passes import OnnxModel, PassContext, PassError
from slmops_optimizer.passes.int8_dynamic import Int8DynamicConfig
from slmops_optimizer.passes.onnx_io import (
    explain_ort_error,
    open_session,
    quantizer_sandbox,
)
from slmops_optimizer.passes.sensitivity import (
    excluding,
    refinement_ladder,
    sensitive_nodes,
)

from .conftest import custom_op_model


def test_sensitive_nodes_of_a_decoder(tiny_decoder: OnnxModel) -> None:
    nodes = sensitive_nodes(tiny_decoder.path)

    assert nodes["lm_head"] == ["/lm_head/MatMul"]  # found through the Cast before "logits"
    assert nodes["first_layer"] == [
        "/model/layers.0/mlp/up_proj/MatMul",
        "/model/layers.0/mlp/down_proj/MatMul",
    ]
    assert nodes["last_layer"] == [
        "/model/layers.1/mlp/up_proj/MatMul",
        "/model/layers.1/mlp/down_proj/MatMul",
    ]
    assert nodes["post_activation"] == [  # fed by the Relu
        "/model/layers.0/mlp/down_proj/MatMul",
        "/model/layers.1/mlp/down_proj/MatMul",
    ]


def test_sandbox_restores_cwd_and_cleans_up_on_failure(
    make_ctx: Callable[..., PassContext], clean_cwd: Path
) -> None:
    ctx = make_ctx()
    seen: list[Path] = []

    def crash() -> None:
        with quantizer_sandbox(ctx, "step") as folder:
            seen.append(folder)
            assert Path.cwd() == folder
            Path("sym_shape_infer_temp.onnx").write_bytes(b"x")  # what ORT leaves behind
            raise RuntimeError("quantizer crashed")

    with pytest.raises(RuntimeError):
        crash()
    folder = seen[0]
    assert folder.parent == ctx.work_dir.resolve() / ".tmp"
    assert Path.cwd() == clean_cwd
    assert not folder.exists()
    assert not (ctx.work_dir / ".tmp").exists()


def test_ort_errors_name_operator_and_node(
    tmp_path: Path, make_ctx: Callable[..., PassContext]
) -> None:
    with pytest.raises(PassError) as caught:
        open_session("some_pass", custom_op_model(tmp_path).path, make_ctx())
    assert "operator com.example:Foo" in str(caught.value)

    shape_error = RuntimeError(
        "[ONNXRuntimeError] : 1 : FAIL : Node (mm) Op (MatMul) [ShapeInferenceError] Incompatible"
    )
    message = explain_ort_error(shape_error)
    assert message.startswith("operator MatMul at node 'mm': ")
    assert message.endswith("or drop the pass from the recipe")
    assert explain_ort_error(OSError("disk full")).endswith("the previous step's log")


def test_ladder_is_cumulative_and_skips_no_ops() -> None:
    start = Int8DynamicConfig(per_channel=True, nodes_to_exclude=["a"])
    ladder = refinement_ladder(
        start,
        [
            ("per-channel", lambda c: {"per_channel": True}),  # already: skipped
            ("keep b", excluding(["b"])),
            ("keep a", excluding(["a"])),  # already: skipped
            ("keep c", excluding(["c"])),
        ],
    )
    assert [r.description for r in ladder] == ["keep b", "keep c"]
    assert ladder[-1].config.nodes_to_exclude == ["a", "b", "c"]
    assert start.nodes_to_exclude == ["a"]
    assert os.fspath(Path.cwd())  # nothing above changed directory


def test_registered_under_the_names_profiles_use() -> None:
    from slmops_optimizer.passes import create_pass, pass_names

    mine = {"graph_optimize", "int8_dynamic", "int8_static_qdq", "weight_only", "fp16", "prune"}
    assert mine <= set(pass_names())
    # The configs the device profiles pass (deploy/profiles/*.yaml).
    create_pass(
        "weight_only", {"bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4}
    )
    create_pass("int8_static_qdq", {"calibration": "entropy", "per_channel": True})
    create_pass("fp16", {"keep_io_types": True})
    create_pass("int8_dynamic", {"per_channel": True})
    create_pass("graph_optimize", {})
