"""Unstructured magnitude pruning of MatMul/Gemm weights.

In each weight matrix the ``sparsity`` fraction of smallest-magnitude values is set to zero.
The ONNX file keeps its size (dense tensors) and ONNX Runtime's CPU kernels gain no speed from
scattered zeros; what shrinks is the compressed artifact (zeros compress), which is what a
gateway downloads. Both the achieved sparsity and that compressed size (zlib, sampled past
32 MiB) land in the metrics.

Only weights a MatMul or Gemm multiplies by are touched: embeddings (Gather), norms and biases
are not candidates, and ``exclude`` keeps more out by name (the lm_head by default).
"""

from __future__ import annotations

import fnmatch
import zlib
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import Field

from slmops_optimizer.passes import register
from slmops_optimizer.passes.base import OnnxModel, Pass, PassConfig, PassContext, Refinement
from slmops_optimizer.passes.onnx_io import (
    load_model,
    note_result,
    producing,
    require_input,
    save_model,
    self_check,
)
from slmops_optimizer.passes.sensitivity import (
    Rung,
    refinement_ladder,
)

#: zlib level 1: zeros compress at any level, and level 1 is several times faster than 6.
_ZLIB_LEVEL = 1
_CHUNK_BYTES = 1 << 20
_SAMPLED_BYTES = 32 << 20


class PruneConfig(PassConfig):
    sparsity: float = Field(
        0.5, ge=0.0, le=0.99, description="Fraction of each weight matrix set to zero."
    )
    min_elements: int = Field(
        16_384, ge=1, description="Weights with fewer elements are left dense."
    )
    exclude: list[str] = Field(
        default_factory=lambda: ["*lm_head*"],
        description="Glob patterns (fnmatch) on initializer or node names left dense.",
    )


@register
class Prune(Pass[PruneConfig]):
    """Zero the smallest-magnitude weights of every MatMul/Gemm."""

    name = "prune"
    config_class = PruneConfig

    def refinements(self, model: OnnxModel, ctx: PassContext) -> list[Refinement]:
        # Halve the sparsity, then halve again; below 10% pruning saves next to nothing.
        rungs: list[Rung] = []
        for divisor in (2, 4):
            level = round(self.config.sparsity / divisor, 3)
            if level >= 0.1:
                rungs.append((f"sparsity {level:g}", partial(_set_sparsity, level)))
        return refinement_ladder(self.config, rungs)

    def run(self, model: OnnxModel | None, ctx: PassContext) -> OnnxModel:
        import numpy as np
        from onnx import numpy_helper

        source = require_input(self.name, model)
        config = self.config
        proto = load_model(source.path, self.name)
        targets = _prunable(proto, config)
        zeros = total = 0
        for init in proto.graph.initializer:
            if init.name not in targets:
                continue
            ctx.check_cancelled()
            weights = numpy_helper.to_array(init)
            magnitude = np.abs(weights)
            drop = min(round(weights.size * config.sparsity), weights.size - 1)
            # Zero what lies below the drop-th smallest magnitude (ties keep a few more).
            cut = np.partition(magnitude.ravel(), drop)[drop]
            pruned = np.where(magnitude < cut, 0, weights).astype(weights.dtype)
            init.CopyFrom(numpy_helper.from_array(pruned, init.name))
            zeros += int(weights.size - np.count_nonzero(pruned))
            total += weights.size
        with producing(ctx, self.name) as out:
            result = save_model(proto, out)
            del proto
            self_check(self.name, result, ctx)
        achieved = zeros / total if total else 0.0
        compressed_mb = _compressed_size(result.path.parent) / 1e6
        ctx.metrics["sparsity"] = round(achieved, 4)
        ctx.metrics["compressed_size_mb"] = round(compressed_mb, 3)
        note_result(
            ctx,
            self.name,
            source,
            result,
            f"{len(targets)} weight(s) at sparsity {achieved:.3f}, {compressed_mb:.1f} MB zlib",
        )
        return result


def _set_sparsity(level: float, config: Any) -> dict[str, Any]:
    return {"sparsity": level}


def _prunable(proto: Any, config: PruneConfig) -> set[str]:
    """Initializers a MatMul (input B) or Gemm (input B) multiplies by, minus the excluded and
    those any other node also reads (a tied embedding must not lose rows)."""
    from onnx import TensorProto

    weights = {
        init.name: init
        for init in proto.graph.initializer
        if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
    }
    shared = {
        name
        for node in proto.graph.node
        if node.op_type not in ("MatMul", "Gemm")
        for name in node.input
    }
    chosen = set()
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        name = node.input[1]
        init = weights.get(name)
        if init is None or name in shared or _size(init) < config.min_elements:
            continue
        if any(fnmatch.fnmatch(n, p) for p in config.exclude for n in (name, node.name)):
            continue
        chosen.add(name)
    return chosen


def _size(init: Any) -> int:
    count = 1
    for dim in init.dims:
        count *= dim
    return count


def _compressed_size(folder: Path) -> int:
    """zlib-compressed bytes of the folder's files. Float weights compress at only ~30 MB/s, so
    past ``_SAMPLED_BYTES`` per file every n-th 1 MiB chunk is compressed and the result scaled:
    pruned zeros are spread evenly over each tensor, so the estimate is within a few percent."""
    size = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        total = path.stat().st_size
        stride = max(1, -(-total // _SAMPLED_BYTES))  # ceil: at most ~_SAMPLED_BYTES compressed
        read = packed = 0
        with path.open("rb") as handle:
            for index, chunk in enumerate(iter(lambda: handle.read(_CHUNK_BYTES), b"")):
                if index % stride == 0:
                    read += len(chunk)
                    packed += len(zlib.compress(chunk, _ZLIB_LEVEL))
        size += round(packed * total / read) if read else 0
    return size
