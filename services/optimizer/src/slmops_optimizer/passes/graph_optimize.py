"""Offline graph optimization: ONNX Runtime's own optimizer plus its transformer fusions.

1. ``basic`` ORT optimization first (constant folding, redundant-node elimination): it collapses
   the shape arithmetic of a TorchScript export so the fusion patterns below can match.
2. Transformer fusion (``onnxruntime.transformers.optimizer.optimize_model`` at ``opt_level=0``,
   pure Python, no torch import): Attention, SkipLayerNormalization, BiasGelu and
   EmbedLayerNormalization for BERT-like encoders. A decoder's generation graph comes fused from
   onnxruntime-genai's builder and passes through unchanged.
3. ORT optimization at ``level`` once more on the fused graph, saved with
   ``optimized_model_filepath``.

Portability: ``extended`` output contains ``com.microsoft`` contrib ops (FusedMatMul, Attention,
SkipLayerNormalization, ...) that ONNX Runtime's CPU and CUDA execution providers implement;
other EPs (TensorRT, QNN) leave those nodes to the CPU fallback, so recipes for them use ``basic``
or skip this pass. The ``layout`` level (NCHWc, CPU-ISA-specific kernels) is not offered: its
output only runs on the machine that optimized it. QDQ pairs are never folded into QLinear ops
(``session.disable_quant_qdq``): a QDQ graph stays portable, each device folds it at load time.

The output must reproduce the input: both run on the sample batches and a difference above
``max_abs_diff`` fails the step (a fusion that changes the numbers is a bug, not a trade-off).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from slmops_optimizer.passes import register
from slmops_optimizer.passes.base import OnnxModel, Pass, PassConfig, PassContext, PassError
from slmops_optimizer.passes.onnx_io import (
    MODEL_FILE,
    explain_ort_error,
    is_large,
    load_model,
    note_result,
    open_session,
    producing,
    quantizer_sandbox,
    require_input,
    sample_feeds,
)

_ENCODER_TASKS = ("feature-extraction", "text-classification")


class GraphOptimizeConfig(PassConfig):
    level: Literal["basic", "extended"] = Field(
        "extended",
        description="ONNX Runtime optimization level saved into the model: 'basic' keeps standard "
        "ONNX ops only (any runtime, any EP); 'extended' adds ORT contrib-op fusions (ORT CPU "
        "and CUDA EPs).",
    )
    transformer_fusion: bool = Field(
        True, description="Apply ORT's transformer fusions (Attention, SkipLayerNorm, Gelu, ...)."
    )
    model_type: Literal["auto", "bert", "gpt2"] = Field(
        "auto",
        description="Fusion patterns to apply: 'auto' = 'bert' for encoders, none for decoders.",
    )
    num_heads: int = Field(
        0, ge=0, description="Attention heads; 0 = read from the graph (query Reshape)."
    )
    hidden_size: int = Field(
        0, ge=0, description="Hidden size; 0 = read from the graph (embedding width)."
    )
    max_abs_diff: float = Field(
        1e-3,
        gt=0,
        description="Largest absolute difference between input and output model outputs on the "
        "sample batches.",
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> GraphOptimizeConfig:
        if (self.num_heads == 0) != (self.hidden_size == 0):
            raise ValueError("set both num_heads and hidden_size, or neither (0 = detect)")
        if self.num_heads and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.model_type != "auto" and not self.transformer_fusion:
            raise ValueError(f"model_type {self.model_type!r} needs transformer_fusion: true")
        return self


@register
class GraphOptimize(Pass[GraphOptimizeConfig]):
    """Lossless graph rewrites: constant folding, node elimination, transformer fusions."""

    name = "graph_optimize"
    config_class = GraphOptimizeConfig

    def run(self, model: OnnxModel | None, ctx: PassContext) -> OnnxModel:
        source = require_input(self.name, model)
        if ctx.generation is not None:
            # onnxruntime-genai's builder writes the fused graph (GroupQueryAttention,
            # SkipSimplifiedLayerNormalization): re-optimizing it offline gains nothing and
            # would bake host-specific choices into it. ONNX Runtime still optimizes at load.
            ctx.note(f"{self.name}: generation graph, already fused by its builder: unchanged")
            return source
        model_type = self._model_type(ctx)
        with producing(ctx, self.name) as out:
            with quantizer_sandbox(ctx, self.name) as tmp:
                start = source.path
                if model_type:  # fusion patterns match on the folded graph
                    start = _ort_optimize(self.name, start, tmp / MODEL_FILE, "basic", ctx)
                    start = self._fuse(source, start, tmp / "fused" / MODEL_FILE, model_type, ctx)
                _ort_optimize(self.name, start, out / MODEL_FILE, self.config.level, ctx)
            result = OnnxModel(out / MODEL_FILE)
            self._check_equivalent(source, result, ctx)
        fused = f"{model_type} fusion" if model_type else "no fusion"
        note_result(ctx, self.name, source, result, f"ORT {self.config.level}, {fused}")
        return result

    def _model_type(self, ctx: PassContext) -> str | None:
        if not self.config.transformer_fusion:
            return None
        if self.config.model_type != "auto":
            return self.config.model_type
        if ctx.source.task in _ENCODER_TASKS:
            return "bert"
        ctx.note(f"{self.name}: decoder: transformer fusion skipped (no pattern for this export)")
        return None

    def _fuse(
        self, source: OnnxModel, path: Path, target: Path, model_type: str, ctx: PassContext
    ) -> Path:
        from onnxruntime.transformers.optimizer import optimize_model

        heads, hidden = self.config.num_heads, self.config.hidden_size
        if not heads:
            heads, hidden = _detect_heads(load_model(source.path, self.name, False), ctx)
        try:
            fused = optimize_model(
                str(path), model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=0
            )
        except Exception as exc:
            raise PassError(
                f"{self.name}: {model_type} fusion failed: {explain_ort_error(exc)}; set "
                "transformer_fusion: false"
            ) from exc
        counts = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
        ctx.note(
            f"{self.name}: {model_type} fusion (heads {heads or '?'}, hidden "
            f"{hidden or '?'}): {counts or 'nothing matched'}"
        )
        target.parent.mkdir()
        fused.save_model_to_file(str(target), use_external_data_format=is_large(OnnxModel(path)))
        return target

    def _check_equivalent(self, source: OnnxModel, result: OnnxModel, ctx: PassContext) -> None:
        import numpy as np

        before = open_session(self.name, source.path, ctx)
        after = open_session(self.name, result.path, ctx)
        worst = 0.0
        for feed in sample_feeds(ctx, before.get_inputs())[:2]:
            want = before.run(None, feed)[0]
            try:
                got = after.run(None, feed)[0]
            except Exception as exc:
                raise PassError(
                    f"{self.name}: the optimized model fails to run: {explain_ort_error(exc)}"
                ) from exc
            worst = max(worst, float(np.abs(got.astype(np.float64) - want).max()))
        ctx.metrics["graph_optimize_max_abs_diff"] = worst
        if not worst <= self.config.max_abs_diff:  # NaN fails too
            raise PassError(
                f"{self.name}: the optimized graph changes the outputs by {worst:.3g} (> "
                f"{self.config.max_abs_diff:g}); set transformer_fusion: false or level: basic"
            )


def _ort_optimize(pass_name: str, src: Path, dst: Path, level: str, ctx: PassContext) -> Path:
    """Run ORT's optimizer at ``level`` on ``src`` and save the result at ``dst``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.intra_op_threads
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    options.optimized_model_filepath = str(dst)
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    if is_large(OnnxModel(src)):
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", dst.name + ".data"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    try:
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PassError(
            f"{pass_name}: ONNX Runtime rejects the model: "
            f"{explain_ort_error(exc, 'drop this pass or use level: basic')}"
        ) from exc
    return dst


def _detect_heads(model: Any, ctx: PassContext) -> tuple[int, int]:
    """(num_heads, hidden_size): from the source's config.json when it is a Hugging Face folder,
    else from the graph, else (0, 0) and ORT's fusion skips Attention.

    From the graph: hidden = width of the largest Gather table (the word embeddings); head_dim =
    the constant after -1 (or heads) in the attention Reshape targets [batch, seq, -1, head_dim].
    """
    import json
    from collections import Counter

    from onnx import numpy_helper

    config = ctx.source.path / "config.json"
    if ctx.source.kind == "hf-safetensors" and config.is_file():
        values = json.loads(config.read_text())
        heads, hidden = values.get("num_attention_heads", 0), values.get("hidden_size", 0)
        if heads and hidden:
            return int(heads), int(hidden)
    graph = model.graph
    gathered = {node.input[0] for node in graph.node if node.op_type == "Gather"}
    tables = [t for t in graph.initializer if len(t.dims) == 2 and t.name in gathered]
    if not tables:
        return 0, 0
    hidden = int(max(tables, key=lambda t: t.dims[0]).dims[1])
    scalars: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and len(node.attribute[0].t.dims) <= 1:
            values = numpy_helper.to_array(node.attribute[0].t).ravel().tolist()
            if len(values) == 1 and isinstance(values[0], int):
                scalars[node.output[0]] = values[0]
    head_dims: Counter[int] = Counter()
    for node in graph.node:
        if node.op_type == "Concat" and len(node.input) == 4:
            a, d = scalars.get(node.input[2], 0), scalars.get(node.input[3], 0)
            if 1 < d < hidden and hidden % d == 0 and a in (-1, hidden // d):
                head_dims[d] += 1
    if not head_dims:
        return 0, 0
    head_dim = head_dims.most_common(1)[0][0]
    return hidden // head_dim, hidden
