"""``gguf_blocks``: keep a GGUF model's own quantized blocks instead of requantizing its weights.

Why exact mapping beats dequantize + requantize: a GGUF file is already block-quantized, and
``convert`` dequantizes it to fp32. Quantizing that graph again (round to nearest, 4 or 8 bits)
puts a second rounding error on top of the first, on a grid that almost never lines up with the
file's: on SmolLM2, INT4 RTN of the dequantized weights kept only ~0.61 top-1 agreement. The
blocks that were rounded once fit ONNX Runtime's block-quantized operators as they are, so
mapping them gives back the very weights the fp32 model computes with (float rounding at most),
needs no calibration and keeps the file about as small as the GGUF.

Every block type whose value is ``scale * (code - zero) + offset`` per (sub-)block maps: Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K - what Q4_K_M / Q5_K_M / Q8_0 files are
made of (:mod:`slmops_optimizer.gguf.blocks`, :mod:`slmops_optimizer.gguf.mapping`):

- MatMul weights → MatMulNBits (com.microsoft) with ONNX Runtime's default zero point, never
  float zero points (no prepacking: ~100x slower); a block offset (Q4_1's ``m``, a K-quant's
  ``-dmin * min``) becomes an exact correction ``blocksum(x) @ c^T``. Codes of at most 4 bits
  are one 4-bit MatMulNBits (``accuracy_level`` as configured). Wider codes (Q5_x, Q6_K, Q8_0)
  take the form ``wide_codes`` says: ``split4`` (two 4-bit planes, fp32 activations, exact),
  ``int8`` (one 8-bit MatMulNBits with int8 activations, accuracy_level 4 - the only level at
  which ONNX Runtime's 8-bit kernel is fast) or ``dense`` (an fp32 weight expanded from the
  8-bit codes when the session loads).
- A weight packing several GGUF tensors (onnxruntime-genai's ``qkv_proj``) is matched segment by
  segment and becomes one MatMulNBits over the concatenated codes, or one per run + Concat.
- The embedding Gather → GatherBlockQuantized on the same codes and scales as a tied LM head
  (the builder's ``Gather(Transpose(lm_head))`` included): one copy of the table in the file.
- Block types that do not map (IQ*, F16...) fall back to dequantize + round to nearest
  (``fallback_bits``, ``fallback_block_size``); the log names every such tensor.

Measured on onnxruntime-genai builder graphs (2 threads, an AVX2 host without VNNI, plain ONNX
Runtime; ``services/optimizer/scripts/gguf_forms_bench.py``): files 1.01x the GGUF for
SmolLM2-135M Q4_1, 1.08x for Gemma 3 270M Q4_K_M (plus the builder's own 67 MB rotary caches).
With the default (4-bit at accuracy_level 0, wide codes split4) top-1 agreement with the fp32
graph is 1.000 and greedy text identical; a one-token decode step is 1.25-1.55x faster than
fp32, a 64-token prefill 1.3-2.1x slower (4-bit MatMulNBits with fp32 activations is no
faster than the fp32 GEMM for 64 rows, and split4 runs two). ``wide_codes=int8`` runs
Gemma's decode step 2.2x faster than fp32 and its prefill at fp32's speed, at top-1 agreement
0.97-0.98 (int8 activations, like llama.cpp's): the speed choice.

``ctx.details["tensor_map"]`` records, per GGUF tensor, its block type, the form, bits, block
size and the mapping's largest difference from the ``gguf`` package's own dequantization (0,
or within the float32 rounding bound it also records).

The input must be the fp32 graph of the very GGUF file the job started from (a TorchScript
export or onnxruntime-genai's builder graph): weights are matched to GGUF tensors by content,
not by name.
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
    from slmops_optimizer.gguf.mapping import WeightPack
    from slmops_optimizer.gguf.matching import Candidate, Match, Orientation, Use
    from slmops_optimizer.gguf.reader import GGUFFile, GGUFTensor

#: Above this an ONNX file must keep its weights as external data (protobuf's 2 GB limit).
_SINGLE_FILE_LIMIT = 1_800_000_000
#: Largest error (relative to the weight's largest magnitude) an exact mapping may show; the
#: mapping's own bound is far below (0, or float32 rounding of the correction term).
_EXACT_TOLERANCE = 1e-5


class GgufBlocksConfig(PassConfig):
    embeddings: bool = Field(
        True, description="Quantize embedding tables (GatherBlockQuantized) too."
    )
    share_tied_lm_head: bool = Field(
        True, description="A tied LM head reads the embedding's quantized table (one copy)."
    )
    wide_codes: Literal["split4", "int8", "dense"] = Field(
        "split4",
        description="How codes wider than 4 bits (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0) run. split4: "
        "two 4-bit MatMulNBits (code = 16 high + low), exact weights with fp32 activations on "
        "the fast 4-bit kernels. int8: one 8-bit MatMulNBits, always accuracy_level 4 (int8 "
        "activations, like llama.cpp's own dot products; ONNX Runtime's 8-bit kernel is ~100x "
        "slower at other levels). dense: an fp32 weight expanded from the 8-bit codes when the "
        "session loads (fp32 memory, 8-bit file).",
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
        description="accuracy_level of the 4-bit MatMulNBits (codes of at most 4 bits and the "
        "split4 planes). 0 (default): fp32 activations, the mapped model computes what the "
        "fp32 one does (SmolLM2 top-1 agreement 1.0). 4: int8 activations, ~2x faster for "
        "1-token inputs but agreement fell to 0.953 on SmolLM2. 8-bit fallback weights run "
        "as 8-bit MatMulNBits at level 4 or with wide_codes int8, else are expanded to fp32 "
        "when the session loads.",
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
        """accuracy_level 0 (fp32 activations), wide codes split4 (fp32 activations), an 8-bit
        fallback, then fallback kept fp32; the mapped weights never change (they already are
        the source's weights)."""
        ladder: list[Refinement] = []
        config = self.config
        steps: list[tuple[str, dict[str, Any]]] = []
        if config.accuracy_level not in (None, 0):
            steps.append(("accuracy_level 0 (fp32 activations)", {"accuracy_level": 0}))
        if config.wide_codes == "int8":
            steps.append(("wide codes split4 (fp32 activations)", {"wide_codes": "split4"}))
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

        from slmops_optimizer.gguf.reader import read_gguf
        from slmops_optimizer.gguf.rewrite import MS_DOMAIN, Rewriter

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
            first = node.output[0] if node.output else None
            if first in plan.dropped:
                continue
            target = plan.node_targets.get(first) if first else None
            if target is None:
                kept = onnx.NodeProto()
                kept.CopyFrom(node)
                nodes.append(kept)
                continue
            kind, keys = target
            packs = [plan.packs[key] for key in keys]
            bases = [plan.bases[key] for key in keys]
            nodes.extend(
                rewriter.matmul(node, packs, bases)
                if kind == "matmul"
                else rewriter.gather(node, packs[0], bases[0])
            )
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        _replace_initializers(proto.graph, rewriter.initializers)
        if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))

        head_size = _head_size(proto.graph, ctx, model.path.parent)
        out_dir = ctx.output_dir("gguf_blocks")
        out = out_dir / "model.onnx"
        _save(proto, out)
        del proto
        _self_check(out, ctx, head_size)
        _report(plan, ctx)
        return OnnxModel(out)


# ------------------------------------------------------------------------------------------------

PackKey = tuple[str, ...]


class _Plan:
    """Which packs each replaced node uses, and what happened to every weight."""

    def __init__(self) -> None:
        self.packs: dict[PackKey, WeightPack] = {}
        self.bases: dict[PackKey, str] = {}
        # first output of a replaced node → (how it uses the weight, pack keys in row order)
        self.node_targets: dict[str, tuple[Orientation, tuple[PackKey, ...]]] = {}
        self.dropped: set[str] = set()  # first outputs of nodes removed (a tied table's Transpose)
        self.entries: dict[PackKey, dict[str, Any]] = {}  # the tensor map, one entry per pack
        self.kept: list[str] = []  # weights left fp32 on purpose, with why
        self.unmatched = 0  # 2-D MatMul/Gather weights that no GGUF tensor holds
        self.max_error = 0.0  # largest |mapped - gguf| weight difference of the exact packs

    @property
    def exact(self) -> dict[str, str]:
        """GGUF tensor mapped exactly → its block type."""
        return {e["tensor"]: e["type"] for e in self.entries.values() if e["form"] != "rtn"}

    @property
    def fallback(self) -> dict[str, str]:
        """GGUF tensor requantized → its block type."""
        return {e["tensor"]: e["type"] for e in self.entries.values() if e["form"] == "rtn"}

    @property
    def tied(self) -> list[str]:
        """GGUF tensors whose one pack a Gather and a MatMul both read."""
        return sorted({e["tensor"] for e in self.entries.values() if len(e["uses"]) > 1})


def _plan(graph: Any, gguf_file: GGUFFile, config: GgufBlocksConfig, ctx: PassContext) -> _Plan:
    from slmops_optimizer.gguf.matching import find_candidates, match_weights

    candidates, uses = find_candidates(graph)
    matches = match_weights(candidates, gguf_file)
    by_name = {c.name: c for c in candidates}
    by_initializer: dict[str, list[Match]] = {}
    for match in matches:
        by_initializer.setdefault(match.initializer, []).append(match)
    plan = _Plan()
    plan.unmatched = len(candidates) - len(by_initializer)
    for name, found in by_initializer.items():
        found.sort(key=lambda m: m.segment or (0, 0))
        for use in uses[name]:
            ctx.check_cancelled()
            keys = _use_keys(use, found, by_name[name], gguf_file, config, plan)
            if keys is None:
                continue
            plan.node_targets[use.node.output[0]] = (use.kind, keys)
            if use.transpose is not None:
                plan.dropped.add(use.transpose.output[0])
    return plan


def _use_keys(
    use: Use,
    found: list[Match],
    cand: Candidate,
    gguf_file: GGUFFile,
    config: GgufBlocksConfig,
    plan: _Plan,
) -> tuple[PackKey, ...] | None:
    """The packs one node reads (made on first use), or None when it stays as it is."""
    from slmops_optimizer.gguf.rewrite import tensor_base_name

    tensors = ", ".join(m.tensor for m in found)
    if use.kind == "gather" and not config.embeddings:
        plan.kept.append(f"{tensors} (an embedding; embeddings=false)")
        return None
    if use.kind == "gather" and len(found) > 1:
        plan.kept.append(f"{tensors} (an embedding table packing several tensors)")
        return None
    keys: list[PackKey] = []
    made: dict[PackKey, tuple[GGUFTensor, WeightPack, float]] = {}
    for match in found:
        key: PackKey = (match.tensor, match.order_key)
        if not config.share_tied_lm_head:
            key = (*key, use.kind)
        keys.append(key)
        if key in plan.packs:
            continue
        tensor = gguf_file.tensors[match.tensor]
        rows = cand.rows()
        if match.segment is not None:
            rows = rows[match.segment[0] : match.segment[1]]
        packed = _pack(tensor, match, rows, use.kind, config, plan)
        if packed is None:  # one segment stays fp32: so does the whole weight
            return None
        made[key] = (tensor, *packed)
    for key, (tensor, pack, error) in made.items():
        plan.packs[key] = pack
        plan.bases[key] = tensor_base_name(tensor)
        plan.entries[key] = _entry(tensor, pack, error, config)
        if pack.exact:
            plan.max_error = max(plan.max_error, error)
    for key in keys:
        if use.kind not in plan.entries[key]["uses"]:
            plan.entries[key]["uses"].append(use.kind)
    return tuple(keys)


def _pack(
    tensor: GGUFTensor,
    match: Match,
    rows: np.ndarray,
    kind: Orientation,
    config: GgufBlocksConfig,
    plan: _Plan,
) -> tuple[WeightPack, float] | None:
    """The blocks of ``tensor`` for the weight ``rows`` (``[N, K]``), exact or requantized,
    and their largest difference from the file's values; None when the weight stays fp32."""
    from slmops_optimizer.gguf.mapping import form_for, pack_blocks, pack_rtn

    if tensor.exact:
        blocks = tensor.blocks()
        if match.order is not None:
            blocks = blocks.permute_rows(match.order)
        pack = pack_blocks(blocks, form_for(blocks, config.wide_codes))
        error = _max_error(pack, tensor, match.order)
        allowed = max(pack.rounding_bound(), _EXACT_TOLERANCE * float(np.abs(rows).max() or 1.0))
        if error > allowed:
            raise PassError(
                f"gguf_blocks: the mapped blocks of {match.tensor} ({tensor.ggml_type}) differ "
                f"from the file's values by {error:.3g} (at most {allowed:.3g} expected): the "
                f"{tensor.ggml_type} block layout is misread; report the file"
            )
        return pack, error
    if not config.quantize_fallback:
        plan.kept.append(f"{match.tensor} ({tensor.ggml_type}; quantize_fallback=false)")
        return None
    if kind == "gather" and rows.shape[1] % config.fallback_block_size:
        plan.kept.append(
            f"{match.tensor} (an embedding {rows.shape[1]} wide, not a multiple of "
            f"fallback_block_size {config.fallback_block_size})"
        )
        return None
    int8 = config.wide_codes == "int8" or config.accuracy_level == 4
    form: Literal["int8", "dense"] = "int8" if int8 else "dense"
    pack = pack_rtn(rows, config.fallback_bits, config.fallback_block_size, tensor.ggml_type, form)
    return pack, float(np.abs(pack.dequantize() - rows).max(initial=0.0))


def _max_error(pack: WeightPack, tensor: GGUFTensor, order: np.ndarray | None) -> float:
    """Largest ``|pack - gguf|`` over the weight, against the ``gguf`` package's own
    dequantization (row-permuted like the pack), a slice of rows at a time."""
    reference = None if order is None else tensor.dequantize()[order]
    step = max(1, (1 << 22) // max(1, pack.k))
    worst = 0.0
    for start in range(0, pack.n, step):
        rows = slice(start, min(pack.n, start + step))
        expected = tensor.dequantize(rows) if reference is None else reference[rows]
        worst = max(worst, float(np.abs(pack.dequantize(rows) - expected).max(initial=0.0)))
    return worst


def _entry(
    tensor: GGUFTensor, pack: WeightPack, error: float, config: GgufBlocksConfig
) -> dict[str, Any]:
    """The tensor map's record of one pack (JSON-ready)."""
    level: int | None
    if pack.form == "int8":
        level = 4
    elif pack.form == "dense":
        level = None
    else:
        level = config.accuracy_level
    return {
        "tensor": tensor.name,
        "type": tensor.ggml_type,
        "shape": [pack.n, pack.k],
        "form": pack.form if pack.exact else "rtn",
        "container": pack.form,
        "bits": pack.bits,
        "planes": len(pack.planes),
        "block_size": pack.block_size,
        "accuracy_level": level,
        "max_abs_error": error,
        "error_bound": pack.rounding_bound() if pack.exact else None,
        "bytes": pack.nbytes,
        "uses": [],
    }


def _replace_initializers(graph: Any, added: list[Any]) -> None:
    """Add the new initializers and drop every initializer no node reads any more."""
    from slmops_optimizer.gguf.matching import subgraph_reads

    graph.initializer.extend(added)
    read = {name for node in graph.node for name in node.input} | subgraph_reads(graph)
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


def _self_check(path: Path, ctx: PassContext, head_size: int | None) -> None:
    """ONNX Runtime loads the model and one small inference gives finite logits."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.intra_op_threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PassError(f"gguf_blocks produced a model ONNX Runtime cannot load: {exc}") from exc
    feed = _check_feed(session.get_inputs(), ctx, head_size)
    try:
        outputs = session.run(None, feed)
    except Exception as exc:
        raise PassError(f"gguf_blocks produced a model that fails to run: {exc}") from exc
    if not all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f"):
        raise PassError("gguf_blocks produced a model whose outputs are not finite")


def _check_feed(inputs: list[Any], ctx: PassContext, head_size: int | None) -> dict[str, Any]:
    """A sample window (or 8 token ids) and, for a generation graph, empty past keys/values."""
    names = [i.name for i in inputs]
    if ctx.samples is not None:
        feeds = ctx.samples.for_inputs(names)
        if feeds and set(feeds[0]) == set(names):
            return {k: v[:1, :16] for k, v in feeds[0].items()}
    ids = np.arange(1, 9, dtype=np.int64).reshape(1, 8)
    feed: dict[str, Any] = {}
    for spec in inputs:
        if spec.name.startswith("past_key_values"):
            heads = spec.shape[1] if isinstance(spec.shape[1], int) else 1
            feed[spec.name] = np.zeros((1, heads, 0, head_size or 1), dtype=np.float32)
        elif spec.name == "position_ids":
            feed[spec.name] = np.arange(ids.shape[1], dtype=np.int64).reshape(1, -1)
        else:
            feed[spec.name] = ids if spec.name == "input_ids" else np.ones_like(ids)
    return feed


def _head_size(graph: Any, ctx: PassContext, model_dir: Path) -> int | None:
    """Head size of a generation graph's past keys (the inputs declare it symbolically): from
    the job's generation spec, the builder's genai_config.json, or the rotary cache."""
    import json

    if not any(i.name.startswith("past_key_values") for i in graph.input):
        return None
    if ctx.generation is not None:
        return int(ctx.generation.head_size)
    try:
        config = json.loads((model_dir / "genai_config.json").read_text())
        return int(config["model"]["decoder"]["head_size"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    caches = {i.name: tuple(i.dims) for i in graph.initializer if i.name == "cos_cache"}
    return 2 * int(caches["cos_cache"][1]) if caches else None


def _report(plan: _Plan, ctx: PassContext) -> None:
    ctx.metrics["mapped_tensors"] = float(len(plan.exact))
    ctx.metrics["fallback_tensors"] = float(len(plan.fallback))
    ctx.metrics["fp32_weights"] = float(len(plan.kept) + plan.unmatched)
    ctx.metrics["mapping_max_abs_error"] = plan.max_error
    ctx.details["tensor_map"] = sorted(plan.entries.values(), key=lambda e: str(e["tensor"]))
    types = _counted(plan.exact.values())
    forms = _counted(str(e["form"]) for e in plan.entries.values() if e["form"] != "rtn")
    tied = f"; one copy for the embedding and the tied LM head: {', '.join(plan.tied)}"
    ctx.note(
        f"gguf_blocks: {len(plan.exact)} GGUF tensors mapped exactly ({types or 'none'}; forms "
        f"{forms or 'none'}; max weight error {plan.max_error:.1e}){tied if plan.tied else ''}"
    )
    if plan.fallback:
        listed = ", ".join(f"{name} ({kind})" for name, kind in sorted(plan.fallback.items()))
        ctx.note(f"gguf_blocks: requantized (round to nearest), blocks that do not map: {listed}")
    kept = list(dict.fromkeys(plan.kept))
    if plan.unmatched:
        kept.append(f"{plan.unmatched} MatMul/Gather weights not found in the GGUF file")
    if kept:
        ctx.note(f"gguf_blocks: weights left fp32: {'; '.join(kept)}")


def _counted(values: Any) -> str:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return ", ".join(f"{value} x{count}" for value, count in sorted(counts.items()))
