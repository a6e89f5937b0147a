"""INT8 static quantization in QDQ format (ONNX Runtime ``quantize_static``).

Weights and activations both get fixed scales, the activations' from calibration on the job's
sample batches. The QDQ format (QuantizeLinear/DequantizeLinear pairs around float ops) is what
NPU execution providers (QNN) offload whole; on a CPU, dynamic per-channel INT8 is usually more
accurate (measured on MiniLM and SmolLM2).

Nodes that consume "minus infinity" constants (the additive attention mask, ~-3.4e38) and what
follows them up to the Softmax always stay fp32: a scale covering that range zeroes every real
activation (MiniLM cosine 0.34 with them quantized).

Calibration is bounded: at most ``max_calibration_batches`` batches, fed to the calibrator one at
a time (ORT's ``CalibStridedMinMax`` stride of 1), so the histogram methods (entropy, percentile)
hold one batch of activations in memory instead of all of them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

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
    graph_input_names,
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

_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
#: Op types that never sit on the attention-mask path (no need to look for it).
_MASK_SAFE = frozenset({"MatMul", "Gemm", "Gather", "Conv", "Attention"})
#: A constant this large is a stand-in for -inf (masking), not a value to quantize.
_EXTREME = 1e4


class Int8StaticQdqConfig(PassConfig):
    calibration: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax",
        description="How activation ranges are chosen from the samples: min/max seen, the "
        "range minimizing KL divergence (entropy), or a percentile of |x|.",
    )
    percentile: float | None = Field(
        None,
        gt=90,
        lt=100,
        description="Percentile of |activation| kept, for calibration 'percentile' only "
        "(default 99.999).",
    )
    per_channel: bool = Field(
        False, description="One weight scale per output channel instead of one per tensor."
    )
    reduce_range: bool | None = Field(
        None,
        description="7-bit weights; None = with per_channel only. ONNX Runtime runs QDQ MatMuls "
        "as u8 x s8 kernels that saturate on x86 CPUs without VNNI, and per-channel weights "
        "fill the 8-bit range in every column: SmolLM2 top-1 0.00 at 8 bits, 0.77 at 7 on the "
        "AVX2 host. Per-tensor, 7 bits only cost precision (MiniLM cosine 0.90 -> 0.81).",
    )
    activation_type: Literal["QUInt8", "QInt8"] = Field(
        "QUInt8", description="Activation type: QUInt8 (asymmetric) or QInt8 (symmetric)."
    )
    weight_type: Literal["QInt8", "QUInt8"] = Field(
        "QInt8", description="Weight type: QInt8 (symmetric) or QUInt8."
    )
    op_types: list[str] | None = Field(
        default_factory=lambda: ["MatMul", "Gemm", "Gather"],
        min_length=1,
        description="Operator types to quantize (weights and their input activations); None = "
        "every type ORT's QDQ quantizer supports, for an NPU that should run the whole graph "
        "in INT8 (the attention-mask path stays fp32 regardless).",
    )
    nodes_to_exclude: list[str] = Field(
        default_factory=list, description="Node names kept in fp32 (e.g. the lm_head MatMul)."
    )
    max_calibration_batches: int = Field(
        8, ge=1, le=64, description="Sample batches used for calibration (time and memory bound)."
    )

    @property
    def weights_7bit(self) -> bool:
        return self.per_channel if self.reduce_range is None else self.reduce_range

    @model_validator(mode="after")
    def _consistent(self) -> Int8StaticQdqConfig:
        if self.percentile is not None and self.calibration != "percentile":
            raise ValueError(
                f"percentile applies to calibration 'percentile' only, not {self.calibration!r}"
            )
        if self.activation_type == "QInt8" and self.weight_type == "QUInt8":
            raise ValueError(
                "activation_type QInt8 with weight_type QUInt8 is not supported by ONNX Runtime; "
                "use QInt8 weights"
            )
        return self


class _Batches:
    """ORT's CalibrationDataReader protocol over a list of feeds, with the range selection its
    strided calibration uses."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self.feeds = feeds
        self.start, self.end, self.next = 0, len(feeds), 0

    def get_next(self) -> dict[str, Any] | None:
        if self.start + self.next >= self.end:
            return None
        self.next += 1
        return self.feeds[self.start + self.next - 1]

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.next = start_index, min(end_index, len(self.feeds)), 0


@register
class Int8StaticQdq(Pass[Int8StaticQdqConfig]):
    """INT8 weights and activations, calibrated on the job's samples, in QDQ format."""

    name = "int8_static_qdq"
    config_class = Int8StaticQdqConfig

    def refinements(self, model: OnnxModel, ctx: PassContext) -> list[Refinement]:
        sensitive = sensitive_nodes(model.path)
        other = "entropy" if self.config.calibration == "minmax" else "minmax"
        return refinement_ladder(
            self.config,
            [
                (f"{other} calibration", lambda c: {"calibration": other, "percentile": None}),
                ("per-channel weights", lambda c: {"per_channel": True}),
                ("FFN down-projections kept fp32", excluding(sensitive["post_activation"])),
                ("lm_head kept fp32", excluding(sensitive["lm_head"])),
                (
                    "first and last layers kept fp32",
                    excluding(sensitive["first_layer"] + sensitive["last_layer"]),
                ),
            ],
        )

    def run(self, model: OnnxModel | None, ctx: PassContext) -> OnnxModel:
        import onnx
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        source = require_input(self.name, model)
        config = self.config
        proto = load_model(source.path, self.name, with_weights=False)
        feeds = self._calibration_feeds(proto, ctx)
        mask_safe = config.op_types is not None and _MASK_SAFE.issuperset(config.op_types)
        masked = [] if mask_safe else _extreme_range_nodes(proto)
        options: dict[str, Any] = {
            "CalibStridedMinMax": 1,  # one batch at a time: bounded memory, any batch shapes
            "DefaultTensorType": onnx.TensorProto.FLOAT,
        }
        if config.calibration == "percentile":
            options["CalibPercentile"] = config.percentile or 99.999
        with producing(ctx, self.name) as out:
            with quantizer_sandbox(ctx, self.name) as tmp:
                try:
                    quantize_static(
                        stage_input(source, tmp),
                        out / MODEL_FILE,
                        _Batches(feeds),
                        quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=config.op_types,
                        per_channel=config.per_channel,
                        reduce_range=config.weights_7bit,
                        activation_type=QuantType[config.activation_type],
                        weight_type=QuantType[config.weight_type],
                        nodes_to_exclude=[*config.nodes_to_exclude, *masked],
                        use_external_data_format=is_large(source),
                        calibrate_method=CalibrationMethod[_METHODS[config.calibration]],
                        extra_options=options,
                    )
                except Exception as exc:
                    hint = (
                        "histogram calibration overflows on huge activations: use calibration "
                        "minmax or fewer op_types"
                        if "bins" in str(exc)
                        else None
                    )
                    raise PassError(
                        f"{self.name}: ONNX Runtime's static quantizer failed: "
                        + (explain_ort_error(exc, hint) if hint else explain_ort_error(exc))
                    ) from exc
            result = OnnxModel(out / MODEL_FILE)
            self_check(self.name, result, ctx)
        what = (
            f"QDQ {config.activation_type}/{config.weight_type}, {config.calibration} "
            f"calibration on {len(feeds)} batch(es), "
            f"{'per-channel' if config.per_channel else 'per-tensor'}"
            f"{' 7-bit' if config.weights_7bit else ''}"
        )
        if masked:
            what += f", {len(masked)} attention-mask node(s) kept fp32"
        missing = unknown_nodes(proto, config.nodes_to_exclude)
        note_result(ctx, self.name, source, result, what, config.nodes_to_exclude, missing)
        return result

    def _calibration_feeds(self, proto: Any, ctx: PassContext) -> list[dict[str, Any]]:
        if ctx.samples is None:
            raise PassError(
                f"{self.name} needs calibration samples (the version's eval set or the built-in "
                "texts) and this job has none; use int8_dynamic, which needs no calibration"
            )
        names = graph_input_names(proto)
        feeds = [f for f in ctx.samples.for_inputs(names) if set(f) == set(names)]
        if not feeds:
            given = sorted(ctx.samples.feeds[0]) if ctx.samples.feeds else []
            raise PassError(
                f"{self.name}: the samples feed {given} but the graph needs {names}; calibration "
                "needs every graph input"
            )
        return feeds[: self.config.max_calibration_batches]


def _extreme_range_nodes(proto: Any) -> list[str]:
    """Nodes fed (directly or through other such nodes) by a float constant of magnitude
    >= 1e4, up to and including the Softmax that brings values back to [0, 1]."""
    extreme = {init.name for init in proto.graph.initializer if _is_extreme(init)}
    nodes = []
    for node in proto.graph.node:  # topological order: one sweep propagates
        if node.op_type == "Constant" and node.attribute and _is_extreme(node.attribute[0].t):
            extreme.update(node.output)
        elif any(name in extreme for name in node.input):
            nodes.append(node.name)
            if node.op_type != "Softmax":
                extreme.update(node.output)
    return nodes


def _is_extreme(tensor: Any) -> bool:
    """A small float constant (scalar or short vector) holding a value of magnitude >= 1e4."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    if len(tensor.dims) > 1 or tensor.external_data or tensor.data_type not in floats:
        return False
    values = numpy_helper.to_array(tensor).astype(np.float64)
    return bool(np.abs(values).max(initial=0) >= _EXTREME)
