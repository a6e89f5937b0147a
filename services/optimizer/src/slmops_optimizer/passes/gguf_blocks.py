"""``gguf_blocks``: keep a GGUF model's own quantized blocks instead of requantizing its weights.

Why exact mapping beats dequantize + requantize: a GGUF file is already block-quantized, and
``convert`` dequantizes it to fp32. Quantizing that graph again (round to nearest, 4 or 8 bits)
puts a second rounding error on top of the first, on a grid that almost never lines up with the
file's: on SmolLM2, INT4 RTN of the dequantized weights kept only ~0.61 top-1 agreement. The
blocks that were rounded once fit ONNX Runtime's block-quantized operators as they are (Q4_0,
Q4_1 and Q8_0: 32 elements, one float16 scale, for Q4_1 one minimum), so mapping them gives
back the very weights the fp32 model computes with (float rounding only), needs no calibration
and keeps the file about as small as the GGUF. Measured on SmolLM2-135M Q4_1 (probe script
``services/optimizer/scripts/gguf_probe.py``): 106.8 MB vs 652.6 MB fp32, top-1 agreement 1.0.

- MatMul weights → MatMulNBits (com.microsoft): 4 bits for Q4_0/Q4_1, block 32, ONNX Runtime's
  default zero point; a Q4_1 block's minimum becomes an exact correction term. 8-bit weights
  (Q8_0) use 8-bit MatMulNBits with ``accuracy_level`` 4, else an fp32 MatMul whose weight is
  expanded from the 8-bit codes when the session loads (:mod:`slmops_optimizer.gguf.mapping`).
- The embedding Gather → GatherBlockQuantized (com.microsoft) on the same codes and scales as a
  tied LM head: one copy of the table in the file.
- Block types that do not map (K-quants, Q5_x, IQ*, F16...) fall back to dequantize + round to
  nearest (``fallback_bits``, ``fallback_block_size``); the log names every such tensor.

Speed: on a 2-core AVX2 host (no VNNI) MatMulNBits is no faster than ONNX Runtime's fp32 GEMM
for 64-token inputs (ratio ~1.0 at accuracy_level 0, ~1.1 at 4); it pays off for short inputs
(1 token: ~0.87x at level 0, ~0.45x at level 4), where the weights' memory traffic dominates.

The input must be the fp32 export of the very GGUF file the job started from: weights are
matched to GGUF tensors by content, not by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
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

if TYPE_CHECKING:
    from slmops_optimizer.gguf.mapping import Candidate, Match, Orientation, WeightPack
    from slmops_optimizer.gguf.reader import GGUFFile, GGUFTensor

#: Above this an ONNX file must keep its weights as external data (protobuf's 2 GB limit).
_SINGLE_FILE_LIMIT = 1_800_000_000
#: Largest error (relative to the weight's largest magnitude) an exact mapping may show.
_EXACT_TOLERANCE = 1e-5


class GgufBlocksConfig(PassConfig):
    embeddings: bool = Field(
        True, description="Quantize embedding tables (GatherBlockQuantized) too."
    )
    share_tied_lm_head: bool = Field(
        True, description="A tied LM head reads the embedding's quantized table (one copy)."
    )
    fallback_bits: Literal[4, 8] = Field(
        8, description="Bits of the round-to-nearest fallback for block types that do not map."
    )
    fallback_block_size: int = Field(32, ge=16, le=256, description="Block of the fallback.")
    quantize_fallback: bool = Field(
        True, description="Requantize weights whose blocks do not map; False keeps them fp32."
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        0,
        description="MatMulNBits accuracy_level. 0 (default): fp32 activations, the mapped "
        "model computes what the fp32 one does (SmolLM2 top-1 agreement 1.0). 4: int8 "
        "activations, ~2x faster for 1-token inputs but agreement fell to 0.953 on SmolLM2. "
        "Below 4, 8-bit weights are expanded to fp32 when the session loads (ONNX Runtime "
        "has no fast fp32-activation 8-bit kernel).",
    )

    @field_validator("fallback_block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two")
        return value


@register
class GgufBlocks(Pass[GgufBlocksConfig]):
    name: ClassVar[str] = "gguf_blocks"
    config_class = GgufBlocksConfig

    def refinements(self, model: OnnxModel, ctx: PassContext) -> list[Refinement]:
        """accuracy_level 0 (fp32 activations), then an 8-bit fallback, then fallback kept fp32;
        the exactly mapped blocks never change (they already are the source's weights)."""
        ladder: list[Refinement] = []
        config = self.config
        steps: list[tuple[str, dict[str, Any]]] = []
        if config.accuracy_level not in (None, 0):
            steps.append(("accuracy_level 0 (fp32 activations)", {"accuracy_level": 0}))
        if config.quantize_fallback and config.fallback_bits == 4:
            steps.append(("8-bit fallback", {"fallback_bits": 8}))
        if config.quantize_fallback:
            steps.append(("fallback weights kept fp32", {"quantize_fallback": False}))
        for description, update in steps:
            config = config.model_copy(update=update)
            keeps_fp32 = update.get("quantize_fallback") is False
            ladder.append(Refinement(description, config, keeps_fp32))
        return ladder

    def run(self, model: OnnxModel | None, ctx: PassContext) -> OnnxModel:
        if model is None:
            raise PassError(
                "gguf_blocks needs the fp32 ONNX export of the GGUF (run convert first)"
            )
        if ctx.source.kind != "gguf":
            raise PassError(
                f"gguf_blocks needs a GGUF source; this recipe's source is {ctx.source.kind!r}: "
                "use weight_only to quantize its weights instead"
            )
        import onnx

        from slmops_optimizer.gguf.mapping import MS_DOMAIN, Rewriter
        from slmops_optimizer.gguf.reader import read_gguf

        gguf_file = read_gguf(ctx.source.path)
        try:
            proto = onnx.load(str(model.path), load_external_data=True)
        except Exception as exc:
            raise PassError(f"gguf_blocks cannot read its input model: {exc}") from exc
        ctx.check_cancelled()

        plan = _plan(proto.graph, gguf_file, self.config, ctx)
        if not plan.packs:
            raise PassError(
                f"gguf_blocks found none of {ctx.source.path.name}'s 2-D tensors among the "
                "model's MatMul weights or Gather tables: is this model the export of that file?"
            )
        ctx.check_cancelled()

        rewriter = Rewriter(proto.graph, self.config.accuracy_level)
        nodes: list[Any] = []
        for node in proto.graph.node:
            target = plan.node_targets.get(node.output[0]) if node.output else None
            if target is None:
                kept = onnx.NodeProto()
                kept.CopyFrom(node)
                nodes.append(kept)
                continue
            kind, key = target
            pack, base = plan.packs[key], plan.bases[key]
            nodes.extend(
                rewriter.matmul(node, pack, base)
                if kind == "matmul"
                else rewriter.gather(node, pack, base)
            )
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        _replace_initializers(proto.graph, rewriter.initializers)
        if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))

        out_dir = ctx.output_dir("gguf_blocks")
        out = out_dir / "model.onnx"
        _save(proto, out)
        del proto
        _self_check(out, ctx)
        _report(plan, ctx)
        return OnnxModel(out)


# ------------------------------------------------------------------------------------------------


class _Plan:
    """Which pack each replaced node uses, and what happened to every weight."""

    def __init__(self) -> None:
        self.packs: dict[tuple[str, ...], WeightPack] = {}
        self.bases: dict[tuple[str, ...], str] = {}
        # first output of a replaced node → (how it uses the weight, pack key)
        self.node_targets: dict[str, tuple[Orientation, tuple[str, ...]]] = {}
        self.exact: dict[str, str] = {}  # GGUF tensor mapped exactly → its block type
        self.fallback: dict[str, str] = {}  # GGUF tensor requantized → its block type
        self.kept: list[str] = []  # initializers left fp32 on purpose, with why
        self.unmatched = 0  # 2-D MatMul/Gather weights that no GGUF tensor holds
        self.max_error = 0.0  # largest |mapped - exported| weight difference
        self.tied: list[str] = []  # GGUF tensors read by both a Gather and a MatMul


def _plan(graph: Any, gguf_file: GGUFFile, config: GgufBlocksConfig, ctx: PassContext) -> _Plan:
    from slmops_optimizer.gguf.mapping import match_weights, tensor_base_name

    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    for name in _subgraph_reads(graph):  # a weight an If/Loop body reads stays as it is
        consumers.setdefault(name, []).append((None, -1))
    candidates = _candidates(graph, consumers)
    matches = match_weights(candidates, gguf_file)
    by_name = {c.name: c for c in candidates}
    plan = _Plan()
    plan.unmatched = len(candidates) - len({m.initializer for m in matches})
    orientations: dict[tuple[str, ...], set[str]] = {}
    for match in matches:
        ctx.check_cancelled()
        tensor = gguf_file.tensors[match.tensor]
        if match.orientation == "gather" and not config.embeddings:
            plan.kept.append(f"{match.tensor} (an embedding; embeddings=false)")
            continue
        key: tuple[str, ...] = (match.tensor, match.order_key)
        if not config.share_tied_lm_head:
            key = (*key, match.orientation)
        if key not in plan.packs:
            pack = _pack(tensor, match, by_name[match.initializer].rows(), config, plan)
            if pack is None:
                continue
            plan.packs[key] = pack
            plan.bases[key] = tensor_base_name(tensor)
        orientations.setdefault(key, set()).add(match.orientation)
        for node, index in consumers[match.initializer]:
            kind = _use_kind(node, index)
            assert kind is not None  # candidates have only MatMul / Gather uses
            plan.node_targets[node.output[0]] = (kind, key)
    plan.tied = sorted({key[0] for key, kinds in orientations.items() if len(kinds) > 1})
    return plan


def _candidates(graph: Any, consumers: dict[str, list[tuple[Any, int]]]) -> list[Candidate]:
    """2-D float initializers used only as MatMul weights, or only as Gather tables."""
    from onnx import TensorProto, numpy_helper

    from slmops_optimizer.gguf.mapping import Candidate

    found: list[Candidate] = []
    for init in graph.initializer:
        if len(init.dims) != 2 or init.data_type != TensorProto.FLOAT:
            continue
        kinds = {_use_kind(node, index) for node, index in consumers.get(init.name, [])}
        if len(kinds) != 1:
            continue
        kind = kinds.pop()
        if kind is None:
            continue
        if init.raw_data:  # read-only, one copy of the bytes (to_array would make two)
            array = np.frombuffer(init.raw_data, dtype="<f4").reshape(tuple(init.dims))
        else:
            array = numpy_helper.to_array(init)
        found.append(Candidate(init.name, kind, array))
    return found


def _pack(
    tensor: GGUFTensor,
    match: Match,
    rows: np.ndarray,
    config: GgufBlocksConfig,
    plan: _Plan,
) -> WeightPack | None:
    """The blocks of ``tensor`` for the weight ``rows`` (``[N, K]``), exact or requantized;
    None when the weight stays fp32."""
    from slmops_optimizer.gguf.mapping import pack_exact, pack_rtn

    if tensor.exact:
        blocks = tensor.blocks()
        if match.order is not None:
            blocks = blocks.permute_rows(match.order)
        pack = pack_exact(blocks)
        error = float(np.abs(pack.dequantize() - rows).max())
        if error > _EXACT_TOLERANCE * (float(np.abs(rows).max()) or 1.0):
            raise PassError(
                f"gguf_blocks: the mapped blocks of {match.tensor} ({tensor.ggml_type}) differ "
                f"from the exported weights by {error:.3g}: the model does not hold this file's "
                "values; export it from the same GGUF file (convert) and retry"
            )
        plan.max_error = max(plan.max_error, error)
        plan.exact[match.tensor] = tensor.ggml_type
        return pack
    if not config.quantize_fallback:
        plan.kept.append(f"{match.tensor} ({tensor.ggml_type}; quantize_fallback=false)")
        return None
    if match.orientation == "gather" and rows.shape[1] % config.fallback_block_size:
        plan.kept.append(
            f"{match.tensor} (an embedding {rows.shape[1]} wide, not a multiple of "
            f"fallback_block_size {config.fallback_block_size})"
        )
        return None
    plan.fallback[match.tensor] = tensor.ggml_type
    return pack_rtn(rows, config.fallback_bits, config.fallback_block_size, tensor.ggml_type)


def _subgraph_reads(graph: Any) -> set[str]:
    """Every value name read inside the subgraphs (If / Loop / Scan bodies) of ``graph``."""
    from onnx import AttributeProto

    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == AttributeProto.GRAPH else []
            bodies += list(attr.graphs) if attr.type == AttributeProto.GRAPHS else []
            for body in bodies:
                names.update(name for inner in body.node for name in inner.input)
                names.update(_subgraph_reads(body))
    return names


def _use_kind(node: Any, index: int) -> Orientation | None:
    """How a node uses an initializer: as a MatMul weight, a Gather table, or otherwise."""
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul" and index == 1:
        return "matmul"
    if node.op_type == "Gather" and index == 0:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        return "gather" if axis == 0 else None
    return None


def _replace_initializers(graph: Any, added: list[Any]) -> None:
    """Add the new initializers and drop every initializer no node reads any more."""
    graph.initializer.extend(added)
    read = {name for node in graph.node for name in node.input} | _subgraph_reads(graph)
    read.update(o.name for o in graph.output)
    keep = [init for init in graph.initializer if init.name in read]
    dropped = {init.name for init in graph.initializer} - {init.name for init in keep}
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)


def _save(proto: Any, out: Path) -> None:
    import onnx

    size = sum(len(init.raw_data) for init in proto.graph.initializer)
    if size > _SINGLE_FILE_LIMIT:
        onnx.save(proto, str(out), save_as_external_data=True, location=f"{out.name}.data")
    else:
        onnx.save(proto, str(out))


def _self_check(path: Path, ctx: PassContext) -> None:
    """ONNX Runtime loads the model and one small inference gives finite logits."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.intra_op_threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PassError(f"gguf_blocks produced a model ONNX Runtime cannot load: {exc}") from exc
    names = [i.name for i in session.get_inputs()]
    feed: dict[str, Any] | None = None
    if ctx.samples is not None:
        feeds = ctx.samples.for_inputs(names)
        feed = {k: v[:1, :16] for k, v in feeds[0].items()} if feeds else None
    if feed is None:
        ids = np.arange(1, 9, dtype=np.int64).reshape(1, 8)
        feed = {n: (ids if n == "input_ids" else np.ones_like(ids)) for n in names}
    try:
        outputs = session.run(None, feed)
    except Exception as exc:
        raise PassError(f"gguf_blocks produced a model that fails to run: {exc}") from exc
    if not all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f"):
        raise PassError("gguf_blocks produced a model whose outputs are not finite")


def _report(plan: _Plan, ctx: PassContext) -> None:
    ctx.metrics["mapped_tensors"] = float(len(plan.exact))
    ctx.metrics["fallback_tensors"] = float(len(plan.fallback))
    ctx.metrics["fp32_weights"] = float(len(plan.kept) + plan.unmatched)
    ctx.metrics["mapping_max_abs_error"] = plan.max_error
    by_type: dict[str, int] = {}
    for kind in plan.exact.values():
        by_type[kind] = by_type.get(kind, 0) + 1
    types = ", ".join(f"{kind} x{count}" for kind, count in sorted(by_type.items()))
    tied = f"; one copy for the embedding and the tied LM head: {', '.join(plan.tied)}"
    ctx.note(
        f"gguf_blocks: {len(plan.exact)} GGUF tensors mapped exactly ({types or 'none'}, max "
        f"weight error {plan.max_error:.1e}){tied if plan.tied else ''}"
    )
    if plan.fallback:
        listed = ", ".join(f"{name} ({kind})" for name, kind in sorted(plan.fallback.items()))
        ctx.note(f"gguf_blocks: requantized (round to nearest), blocks that do not map: {listed}")
    kept = list(plan.kept)
    if plan.unmatched:
        kept.append(f"{plan.unmatched} MatMul/Gather weights not found in the GGUF file")
    if kept:
        ctx.note(f"gguf_blocks: weights left fp32: {'; '.join(kept)}")
