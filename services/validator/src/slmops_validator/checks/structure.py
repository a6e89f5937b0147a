"""Structure: is the file a valid ONNX model the class's runtime can take at all?

ONNX checker with shape inference, the default-domain opset against the class's range, the
operators the class cannot run (named), the precisions of the compute weights against the ones
the class runs, and - for NPU-style classes - that quantization is static QDQ only.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slmops.profiles import DeviceProfile
from slmops.reports import CheckOutcome
from slmops_validator.checks.base import judged, verdict_gate

#: Nodes whose weights set a model's precision; embedding lookups and norms are not compute.
_COMPUTE_OPS = {
    "MatMul",
    "Gemm",
    "Conv",
    "FusedMatMul",
    "Attention",
    "MatMulNBits",
    "MatMulInteger",
    "QLinearMatMul",
    "QAttention",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
}
#: Quantization that is not static QDQ: an NPU compiles none of it.
_NOT_STATIC_QDQ = {
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "MatMulNBits",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "GatherBlockQuantized",
}
_ONNX = ("", "ai.onnx")
_ASIDE_DOMAIN = "slmops.ort_in_onnx_domain"
#: Nodes a weight may pass through between its initializer and the compute node.
_PASS_THROUGH = {"DequantizeLinear", "Transpose", "Reshape", "Cast", "Identity"}


class StructureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    full_check: bool = Field(True, description="Run the ONNX checker with strict shape inference.")


class StructureCheck:
    name = "structure"

    def __init__(self, config: StructureConfig | None = None) -> None:
        self.config = config or StructureConfig()

    def run(self, path: Path, profile: DeviceProfile) -> tuple[CheckOutcome, Any]:
        """The outcome, and the loaded ModelProto (None when the file is not ONNX at all)."""
        import onnx

        started = time.monotonic()
        try:
            proto = onnx.load(str(path))
        except Exception as exc:  # DecodeError and friends: not an ONNX file
            gate = verdict_gate(
                "structure.onnx_checker",
                False,
                value=1,
                detail=f"not a loadable ONNX file: {str(exc)[:300]}",
            )
            return CheckOutcome(name=self.name, gates=[gate]), None
        contrib = ort_ops_in_onnx_domain(proto)
        try:
            with _set_aside(proto, contrib):
                onnx.checker.check_model(proto, full_check=self.config.full_check)
            detail = "valid"
            if contrib:
                listed = ", ".join(f"{op} x{n}" for op, n in sorted(Counter(contrib).items()))
                detail += (
                    f"; ONNX Runtime's own operators in the ONNX domain ({listed}) are checked by "
                    "loading the model in the runtime check"
                )
            checker = verdict_gate("structure.onnx_checker", True, value=0, detail=detail)
        except Exception as exc:  # ValidationError, InferenceError
            checker = verdict_gate(
                "structure.onnx_checker", False, value=1, detail=str(exc).splitlines()[0][:300]
            )
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        ops = Counter(node.op_type for node in proto.graph.node)
        unsupported = sorted(op for op in ops if op in set(profile.unsupported_operators))
        precisions = weight_precisions(proto)
        disallowed = sorted(precisions - set(profile.precisions))
        gates = [
            checker,
            verdict_gate(
                "structure.opset",
                profile.opset_min <= opset <= profile.opset_max,
                value=opset,
                detail=f"the class runs opset {profile.opset_min}-{profile.opset_max}",
            ),
            judged(
                "structure.unsupported_operators",
                len(unsupported),
                0,
                bound="max",
                detail=", ".join(f"{op} x{ops[op]}" for op in unsupported)
                or "none of the class's unsupported operators",
            ),
            judged(
                "structure.disallowed_precisions",
                len(disallowed),
                0,
                bound="max",
                detail=(
                    f"uses {', '.join(disallowed)}; the class runs {', '.join(profile.precisions)}"
                )
                if disallowed
                else f"weights in {', '.join(sorted(precisions)) or 'none'}",
            ),
        ]
        if profile.requires_static_qdq:
            dynamic = sorted(op for op in ops if op in _NOT_STATIC_QDQ)
            has_qdq = ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
            gates.append(
                verdict_gate(
                    "structure.static_qdq",
                    has_qdq and not dynamic,
                    value=len(dynamic),
                    detail=(
                        f"not static QDQ: {', '.join(dynamic)}"
                        if dynamic
                        else "static QDQ"
                        if has_qdq
                        else "no QuantizeLinear/DequantizeLinear "
                        "pairs: the accelerator runs static QDQ graphs only"
                    ),
                )
            )
        evidence: dict[str, Any] = {
            "opset": opset,
            "nodes": sum(ops.values()),
            "operator_types": len(ops),
            "weight_precisions": ", ".join(sorted(precisions)),
            "top_operators": ", ".join(f"{op} x{n}" for op, n in ops.most_common(6)),
        }
        outcome = CheckOutcome(
            name=self.name, gates=gates, evidence=evidence, duration_s=time.monotonic() - started
        )
        return outcome, proto


def ort_ops_in_onnx_domain(proto: Any) -> list[str]:
    """Op types of nodes in the default domain that ONNX does not define but ONNX Runtime
    registers there (``SimplifiedLayerNormalization``, which its transformer fusions and
    onnxruntime-genai's builder emit): valid for the runtime, unknown to ``onnx.checker``."""
    import onnx.defs
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    defined = {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain in _ONNX}
    registered = {s.name for s in ort_c.get_all_operator_schema() if s.domain in _ONNX} - defined
    return [n.op_type for n in proto.graph.node if n.domain in _ONNX and n.op_type in registered]


@contextlib.contextmanager
def _set_aside(proto: Any, op_types: list[str]) -> Iterator[None]:
    """Move those nodes to a domain of their own while the checker runs (it skips operators of
    domains it has no schemas for), then put them back."""
    from onnx import helper

    if not op_types:
        yield
        return
    wanted = set(op_types)
    moved = [n for n in proto.graph.node if n.domain in _ONNX and n.op_type in wanted]
    for node in moved:
        node.domain = _ASIDE_DOMAIN
    proto.opset_import.append(helper.make_opsetid(_ASIDE_DOMAIN, 1))
    try:
        yield
    finally:
        for node in moved:
            node.domain = ""
        del proto.opset_import[len(proto.opset_import) - 1]


def weight_precisions(proto: Any) -> set[str]:
    """Precisions of the weights compute nodes read (traced back through DequantizeLinear)."""
    from onnx import TensorProto

    names = {
        TensorProto.FLOAT: "fp32",
        TensorProto.FLOAT16: "fp16",
        TensorProto.BFLOAT16: "fp16",
        TensorProto.INT8: "int8",
        TensorProto.UINT8: "int8",
        TensorProto.INT4: "int4",
        TensorProto.UINT4: "int4",
    }
    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    found: set[str] = set()
    for node in graph.node:
        if node.op_type not in _COMPUTE_OPS:
            continue
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            found.add("int4" if bits == 4 else "int8")
            continue
        for name in node.input[1:]:
            init = _trace_initializer(name, initializers, producer)
            if init is not None and len(init.dims) >= 2 and init.data_type in names:
                found.add(names[init.data_type])
    return found


def _trace_initializer(name: str, initializers: dict[str, Any], producer: dict[str, Any]) -> Any:
    for _ in range(4):
        if name in initializers:
            return initializers[name]
        node = producer.get(name)
        if node is None or node.op_type not in _PASS_THROUGH or not node.input:
            return None
        name = node.input[0]
    return None
