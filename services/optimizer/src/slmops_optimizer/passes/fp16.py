"""FP16 conversion with ONNX Runtime's converter (``onnxruntime.transformers`` ``OnnxModel``).

ORT's copy of the float16 converter is the one kept up to date with its contrib ops (a graph
after ``graph_optimize`` has Attention, SkipLayerNormalization, ...), uses symbolic shape
inference to type them, and handles models past 2 GB. Halves the weights; on a GPU (CUDA,
TensorRT) it is also faster, on a CPU it is not (ORT computes most fp16 ops through fp32).
"""

from __future__ import annotations

from pydantic import Field

from slmops_optimizer.passes import register
from slmops_optimizer.passes.base import OnnxModel, Pass, PassConfig, PassContext, PassError
from slmops_optimizer.passes.onnx_io import (
    explain_ort_error,
    load_model,
    note_result,
    producing,
    quantizer_sandbox,
    require_input,
    save_model,
    self_check,
    unknown_nodes,
)


class Fp16Config(PassConfig):
    keep_io_types: bool = Field(
        True,
        description="Keep float32 graph inputs and outputs (Casts inside the graph), so callers "
        "feed and read the same types as with the fp32 model.",
    )
    op_block_list: list[str] | None = Field(
        None,
        description="Operator types left in fp32; None = ORT's default list (Range, TopK, "
        "CumSum, ... that have no fp16 kernel).",
    )
    node_block_list: list[str] = Field(
        default_factory=list, description="Node names left in fp32 (e.g. a Softmax that overflows)."
    )


@register
class Fp16(Pass[Fp16Config]):
    """Float32 weights and compute → float16."""

    name = "fp16"
    config_class = Fp16Config

    def run(self, model: OnnxModel | None, ctx: PassContext) -> OnnxModel:
        from onnxruntime.transformers.onnx_model import OnnxModel as OrtOnnxModel

        source = require_input(self.name, model)
        config = self.config
        proto = load_model(source.path, self.name)
        missing = unknown_nodes(proto, config.node_block_list)
        with producing(ctx, self.name) as out:
            # Symbolic shape inference drops sym_shape_infer_temp.onnx in the cwd on failure.
            with quantizer_sandbox(ctx, self.name):
                wrapper = OrtOnnxModel(proto)
                try:
                    wrapper.convert_float_to_float16(
                        keep_io_types=config.keep_io_types,
                        op_block_list=config.op_block_list,
                        node_block_list=config.node_block_list or None,
                    )
                except Exception as exc:
                    raise PassError(
                        f"{self.name}: float16 conversion failed: {explain_ort_error(exc)}"
                    ) from exc
                # The converter appends the Casts of fp32 graph inputs (a generation graph's
                # past keys and values) after the nodes that read them: ONNX requires
                # topological order, and onnx.checker refuses the graph without it.
                wrapper.topological_sort()
            result = save_model(wrapper.model, out)
            del wrapper, proto
            self_check(self.name, result, ctx)
        what = "fp16" + (", fp32 inputs/outputs" if config.keep_io_types else "")
        note_result(ctx, self.name, source, result, what, config.node_block_list, missing)
        return result
