"""INT8 dynamic quantization (ONNX Runtime ``quantize_dynamic``).

Weights are stored as INT8; activations are quantized on the fly, batch by batch, so no
calibration data is needed. Fast on CPUs with 8-bit dot products (x86 VNNI, ARM ``asimddp``).
Measured on all-MiniLM-L6-v2: per-channel keeps cosine 0.99, per-tensor only ~0.96. On this
project's AVX2 host, 8-bit (not 7-bit) per-channel weights saturate: see ``reduce_range``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from slmops_optimizer.passes import register
from slmops_optimizer.passes.base import (
    OnnxModel,
    Pass,
    PassConfig,
    PassContext,
    PassError,
    Refinement,
)
from slmops_optimizer.passes.onnx_io import (
    MODEL_FILE,
    explain_ort_error,
    is_large,
    load_model,
    note_result,
    producing,
    quantizer_sandbox,
    require_input,
    self_check,
    stage_input,
    unknown_nodes,
)
from slmops_optimizer.passes.sensitivity import (
    excluding,
    refinement_ladder,
    sensitive_nodes,
)

#: What ORT's dynamic (IntegerOps) quantizer handles. Gemm is not among them: its weights stay
#: fp32 here; int8_static_qdq quantizes Gemm.
DYNAMIC_OP_TYPES = ("MatMul", "Attention", "Gather", "EmbedLayerNormalization", "Conv", "LSTM")


class Int8DynamicConfig(PassConfig):
    per_channel: bool = Field(
        False,
        description="One scale per output channel of each weight instead of one per tensor: "
        "much closer to fp32 on transformers, slightly slower.",
    )
    reduce_range: bool | None = Field(
        None,
        description="7-bit weights; None = with per_channel only. x86 CPUs without VNNI (AVX2) "
        "multiply u8 x s8 pairs into saturating int16, and per-channel weights fill the 8-bit "
        "range in every column: SmolLM2 top-1 0.00 at 8 bits, 0.83 at 7 on the AVX2 host "
        "(MiniLM 0.992 either way). False only if the device and the host scoring candidates "
        "both have VNNI or ARM dot-product instructions.",
    )
    weight_type: Literal["QInt8", "QUInt8"] = Field(
        "QInt8", description="Signed (QInt8) or unsigned (QUInt8) 8-bit weights."
    )
    op_types: list[str] = Field(
        default_factory=lambda: ["MatMul", "Attention", "Gather", "EmbedLayerNormalization"],
        min_length=1,
        description="Operator types to quantize; Gather (or, after graph_optimize, "
        "EmbedLayerNormalization) quantizes the embedding tables. "
        f"Supported: {', '.join(DYNAMIC_OP_TYPES)}.",
    )
    nodes_to_exclude: list[str] = Field(
        default_factory=list, description="Node names kept in fp32 (e.g. the lm_head MatMul)."
    )

    @property
    def weights_7bit(self) -> bool:
        return self.per_channel if self.reduce_range is None else self.reduce_range

    @field_validator("op_types")
    @classmethod
    def _supported_ops(cls, value: list[str]) -> list[str]:
        unknown = [op for op in value if op not in DYNAMIC_OP_TYPES]
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)} cannot be quantized dynamically by ONNX Runtime; supported: "
                f"{', '.join(DYNAMIC_OP_TYPES)} (use int8_static_qdq for Gemm)"
            )
        return value


@register
class Int8Dynamic(Pass[Int8DynamicConfig]):
    """INT8 weights, activations quantized at run time (no calibration)."""

    name = "int8_dynamic"
    config_class = Int8DynamicConfig

    def refinements(self, model: OnnxModel, ctx: PassContext) -> list[Refinement]:
        sensitive = sensitive_nodes(model.path)
        return refinement_ladder(
            self.config,
            [
                ("per-channel weights", lambda c: {"per_channel": True}),
                ("lm_head kept fp32", excluding(sensitive["lm_head"])),
                (
                    "first and last layers kept fp32",
                    excluding(sensitive["first_layer"] + sensitive["last_layer"]),
                ),
            ],
        )

    def run(self, model: OnnxModel | None, ctx: PassContext) -> OnnxModel:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        source = require_input(self.name, model)
        config = self.config
        missing = (
            unknown_nodes(load_model(source.path, self.name, False), config.nodes_to_exclude)
            if config.nodes_to_exclude
            else []
        )
        with producing(ctx, self.name) as out:
            with quantizer_sandbox(ctx, self.name) as tmp:
                try:
                    quantize_dynamic(
                        stage_input(source, tmp),
                        out / MODEL_FILE,
                        op_types_to_quantize=config.op_types,
                        per_channel=config.per_channel,
                        reduce_range=config.weights_7bit,
                        weight_type=QuantType[config.weight_type],
                        nodes_to_exclude=config.nodes_to_exclude,
                        use_external_data_format=is_large(source),
                        # Without it the quantizer stops on tensors shape inference left untyped
                        # (fused contrib ops, decoder graphs): "Unable to find data type".
                        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                    )
                except Exception as exc:
                    raise PassError(
                        f"{self.name}: ONNX Runtime's dynamic quantizer failed: "
                        f"{explain_ort_error(exc)}"
                    ) from exc
            result = OnnxModel(out / MODEL_FILE)
            self_check(self.name, result, ctx)
        scheme = ("per-channel" if config.per_channel else "per-tensor") + (
            " 7-bit" if config.weights_7bit else ""
        )
        note_result(
            ctx,
            self.name,
            source,
            result,
            f"{scheme} {config.weight_type}",
            config.nodes_to_exclude,
            missing,
        )
        return result
