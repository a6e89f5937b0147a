"""Weight-only block quantization to MatMulNBits (ONNX Runtime ``MatMulNBitsQuantizer``).

Each MatMul weight is cut into blocks of ``block_size`` values along K, each block with its own
scale (and zero point when asymmetric), stored as 4 or 8 bits; activations stay float. The
``com.microsoft::MatMulNBits`` kernel dequantizes on the fly: what a memory-bound CPU wants.

Embeddings (``quantize_embeddings``) become ``GatherBlockQuantized``, always 4 bits, in a step
of their own. That op needs the int4 types of opset 21, and ORT's quantizer only bumps the opset
number without converting the graph: ops whose signature changed since the export's opset
(ReduceMean's ``axes`` moved to an input at 18) then make an invalid model, as seen on SmolLM2.
So the model is converted to opset 21 first with ONNX's version converter, then checked.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

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
    explain_ort_error,
    load_model,
    note_result,
    opset_of,
    producing,
    quantizer_sandbox,
    require_input,
    save_model,
    self_check,
    unknown_nodes,
)
from slmops_optimizer.passes.sensitivity import (
    excluding,
    refinement_ladder,
    sensitive_nodes,
)

#: Opset that carries the INT4/UINT4 types GatherBlockQuantized stores.
_INT4_OPSET = 21
#: Fused contrib ops (graph_optimize) that hold weights MatMulNBitsQuantizer does not touch.
_FUSED_WEIGHT_OPS = ("Attention", "EmbedLayerNormalization")
#: Smallest token embedding table worth quantizing.
_MIN_EMBEDDING_ELEMENTS = 65_536


class WeightOnlyConfig(PassConfig):
    bits: Literal[4, 8] = Field(4, description="Bits per weight: 4 or 8.")
    block_size: int = Field(
        32, description="Weights per quantization block along K (a power of two, 16 to 256)."
    )
    symmetric: bool = Field(
        True, description="Symmetric blocks (scale only); False adds a zero point per block."
    )
    accuracy_level: int | None = Field(
        None,
        ge=0,
        le=4,
        description="MatMulNBits compute type: 0/None = kernel default, 1 fp32, 2 fp16, 3 bf16, "
        "4 int8 (fastest on CPUs with 8-bit dot products).",
    )
    nodes_to_exclude: list[str] = Field(
        default_factory=list, description="Node names kept in fp32 (e.g. the lm_head MatMul)."
    )
    quantize_embeddings: bool = Field(
        False,
        description="Also store the token embedding table in 4 bits (GatherBlockQuantized); "
        "raises the model to opset 21.",
    )

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value < 16 or value > 256 or value & (value - 1):
            raise ValueError(f"must be a power of two from 16 to 256, not {value}")
        return value

    @model_validator(mode="after")
    def _embeddings_are_4_bit(self) -> WeightOnlyConfig:
        if self.quantize_embeddings and self.bits != 4:
            raise ValueError(
                "quantize_embeddings: ONNX Runtime stores embeddings (GatherBlockQuantized) in "
                "4 bits only; use bits: 4 or quantize_embeddings: false"
            )
        return self


@register
class WeightOnly(Pass[WeightOnlyConfig]):
    """4/8-bit block-quantized MatMul weights (MatMulNBits), optional 4-bit embeddings."""

    name = "weight_only"
    config_class = WeightOnlyConfig

    def refinements(self, model: OnnxModel, ctx: PassContext) -> list[Refinement]:
        sensitive = sensitive_nodes(model.path)
        smaller = max(16, self.config.block_size // 2)
        return refinement_ladder(
            self.config,
            [
                ("asymmetric blocks", lambda c: {"symmetric": False}),
                (f"block size {smaller}", lambda c: {"block_size": smaller}),
                ("lm_head kept fp32", excluding(sensitive["lm_head"])),
                (
                    "first and last layers kept fp32",
                    excluding(sensitive["first_layer"] + sensitive["last_layer"]),
                ),
                ("8-bit weights", lambda c: {"bits": 8, "quantize_embeddings": False}),
            ],
        )

    def run(self, model: OnnxModel | None, ctx: PassContext) -> OnnxModel:
        source = require_input(self.name, model)
        config = self.config
        proto = load_model(source.path, self.name)
        missing = unknown_nodes(proto, config.nodes_to_exclude)
        fused = sum(n.op_type in _FUSED_WEIGHT_OPS for n in proto.graph.node)
        if fused:
            ctx.note(
                f"{self.name}: {fused} fused Attention/EmbedLayerNormalization node(s) keep fp32 "
                "weights (only MatMul and Gather are block-quantized): run before graph_optimize"
            )
        with producing(ctx, self.name) as out:
            with quantizer_sandbox(ctx, self.name):
                if config.quantize_embeddings:
                    proto = self._embeddings(proto, ctx)
                proto = self._quantize(proto, ("MatMul",), config.bits, config.nodes_to_exclude)
            result = save_model(proto, out)
            del proto
            self_check(self.name, result, ctx)
        what = (
            f"INT{config.bits} block {config.block_size} "
            f"{'symmetric' if config.symmetric else 'asymmetric'}"
            + (", 4-bit embeddings" if config.quantize_embeddings else "")
        )
        note_result(ctx, self.name, source, result, what, config.nodes_to_exclude, missing)
        return result

    def _embeddings(self, proto: Any, ctx: PassContext) -> Any:
        import onnx

        opset = opset_of(proto)
        if opset < _INT4_OPSET:
            try:
                proto = onnx.version_converter.convert_version(proto, _INT4_OPSET)
            except Exception as exc:
                raise PassError(
                    f"{self.name}: cannot raise opset {opset} to {_INT4_OPSET} for 4-bit "
                    f"embeddings: {explain_ort_error(exc, 'set quantize_embeddings: false')}"
                ) from exc
            ctx.note(f"{self.name}: opset {opset} -> {_INT4_OPSET} for GatherBlockQuantized")
        tables = _embedding_gathers(proto)
        if not tables:
            ctx.note(f"{self.name}: no embedding table found to quantize")
            return proto
        others = [
            n.name for n in proto.graph.node if n.op_type == "Gather" and n.name not in tables
        ]
        return self._quantize(proto, ("Gather",), 4, [*self.config.nodes_to_exclude, *others])

    def _quantize(
        self, proto: Any, op_types: tuple[str, ...], bits: int, exclude: list[str]
    ) -> Any:
        from onnxruntime.quantization import QuantFormat

        nbits = _import_nbits_quantizer()
        algo = nbits.DefaultWeightOnlyQuantConfig(
            block_size=self.config.block_size,
            is_symmetric=self.config.symmetric,
            accuracy_level=self.config.accuracy_level,
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=op_types,
            bits=bits,
        )
        quantizer = nbits.MatMulNBitsQuantizer(proto, nodes_to_exclude=exclude, algo_config=algo)
        try:
            quantizer.process()  # rewrites ``proto`` in place
        except Exception as exc:
            raise PassError(
                f"{self.name}: ONNX Runtime's weight-only quantizer failed on "
                f"{'/'.join(op_types)}: {explain_ort_error(exc)}"
            ) from exc
        return quantizer.model.model


def _import_nbits_quantizer() -> Any:
    """ORT's matmul_nbits_quantizer module, imported without its side effects on logging: it
    calls ``logging.basicConfig(level=INFO)`` at import, which would make every library's INFO
    records (the quantizers log one per tensor) land in the service log."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def _embedding_gathers(proto: Any) -> list[str]:
    """The Gather nodes reading the token embedding table: the 2-D float initializer with the
    most rows (the vocabulary) among those Gathers read. Position and token-type tables are
    small and stay as they are."""
    from onnx import TensorProto

    gathered = {n.input[0] for n in proto.graph.node if n.op_type == "Gather"}
    tables = [
        init
        for init in proto.graph.initializer
        if init.name in gathered and init.data_type == TensorProto.FLOAT and len(init.dims) == 2
    ]
    if not tables:
        return []
    vocab = max(tables, key=lambda t: t.dims[0])
    if vocab.dims[0] * vocab.dims[1] < _MIN_EMBEDDING_ELEMENTS:
        return []
    return [n.name for n in proto.graph.node if n.op_type == "Gather" and n.input[0] == vocab.name]
