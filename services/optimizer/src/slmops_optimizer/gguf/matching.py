"""Which GGUF tensor each MatMul weight / Gather table of an fp32 graph holds, by content.

Names cannot be trusted: the TorchScript exporter renames and transposes weights and stores a
tied embedding twice; onnxruntime-genai's builder packs q, k and v into one weight
(``qkv_proj``, ``[hidden, q + k + v]``) and reads a tied embedding through a Transpose of the LM
head's weight; and transformers un-permutes llama's q/k rows relative to the GGUF file. A weight
is seen here as ``[N, K]`` rows (outputs first, like the GGUF tensor) and matched

- whole: a permutation- and transpose-invariant signature, then the rows themselves (equal, a
  row permutation found by hashing, or the llama q/k interleave within a tolerance);
- else in segments: consecutive row ranges that are whole GGUF tensors with the same ``K``
  (q, then k, then v), found with prefix sums of the same signature;
- else as a row range of one GGUF tensor with the same ``K``: the builder splits phi3's fused
  ``ffn_up`` (gate rows, then up rows) into two MatMuls. GGUF blocks run along ``K``, so the
  blocks of a row range are exactly that weight's blocks. Found with window sums over the
  tensor's row prefix sums, confirmed on the rows (a weight of the same shape as some other
  tensor is never taken for it: the signature and then the rows must agree).

:func:`find_candidates` lists the weights worth matching: 2-D float initializers read only as
MatMul weights and Gather tables (a Transpose feeding Gathers counts as a table read, the
builder's tied embedding), and the nodes that read them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from slmops_optimizer.gguf.reader import GGUFFile

#: How an initializer stores its rows: ``matmul`` transposed (``[K, N]``, a MatMul weight),
#: ``gather`` as they are (``[N, K]``, a Gather table).
Orientation = Literal["matmul", "gather"]

_CHUNK = 1 << 24  # elements per step of a signature sum (bounds the float64 temporaries)


@dataclass(frozen=True)
class Match:
    """ONNX initializer ``initializer`` holds GGUF tensor ``tensor``: with ``rows`` the
    initializer as ``[N, K]`` (transposed for a MatMul weight), ``rows[a + i] ==
    gguf[order[i]]`` for ``segment = (a, b)`` (None: all rows; ``order`` None: same order).

    ``tensor_rows = (start, stop)``: the initializer holds only that row range of the tensor
    (``order`` then indexes the tensor's rows within it), None: every row. Whoever takes the
    tensor's blocks in ``order`` (``GGUFBlocks.permute_rows``) gets exactly the range's."""

    tensor: str
    initializer: str
    orientation: Orientation
    order: np.ndarray | None = field(default=None, compare=False)
    segment: tuple[int, int] | None = None
    tensor_rows: tuple[int, int] | None = None

    @property
    def order_key(self) -> str:
        if self.order is None:
            return "same"
        return hashlib.blake2b(self.order.astype(np.int64).tobytes(), digest_size=8).hexdigest()


@dataclass
class Candidate:
    name: str
    orientation: Orientation
    array: np.ndarray  # the initializer as stored

    def rows(self) -> np.ndarray:
        return self.array.T if self.orientation == "matmul" else self.array

    @property
    def rows_shape(self) -> tuple[int, int]:
        shape = self.array.shape
        return (shape[1], shape[0]) if self.orientation == "matmul" else (shape[0], shape[1])


def _signature(values: np.ndarray) -> tuple[float, float]:
    """Sum of absolute values and of squares: invariant under row permutation and
    transposition. Summed in float64, a slice at a time."""
    flat = np.asarray(values).reshape(-1) if values.flags.c_contiguous else values.T.reshape(-1)
    total_abs = total_sq = 0.0
    for start in range(0, flat.size, _CHUNK):
        part = flat[start : start + _CHUNK].astype(np.float64)
        total_abs += float(np.abs(part).sum())
        total_sq += float(np.square(part).sum())
    return total_abs, total_sq


def _close(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(abs(x - y) <= 1e-6 * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def _row_order(rows: np.ndarray, reference: np.ndarray, heads: Iterable[int]) -> Any:
    """``None`` if equal, an index array if a row permutation of ``reference``, else False."""
    if rows.shape != reference.shape:
        return False
    if np.array_equal(rows, reference):
        return None
    if np.allclose(rows, reference, rtol=1e-5, atol=1e-6):
        return None
    # Exact row hashing: both come from the same float32 dequantization.
    index: dict[bytes, int] = {}
    for i, row in enumerate(np.ascontiguousarray(reference)):
        index.setdefault(row.tobytes(), i)
    found = [index.get(row.tobytes()) for row in np.ascontiguousarray(rows)]
    if all(i is not None for i in found):
        return np.asarray(found, dtype=np.int64)
    # Tolerant fallback: transformers' inverse of the llama.cpp q/k row interleave.
    n = reference.shape[0]
    for n_head in heads:
        if n_head <= 0 or n % (2 * n_head):
            continue
        order = llama_qk_order(n, n_head)
        if np.allclose(rows, reference[order], rtol=1e-5, atol=1e-6):
            return order
    return False


def llama_qk_order(rows: int, n_head: int) -> np.ndarray:
    """Row ``i`` of a Hugging Face llama q/k weight is row ``order[i]`` of the GGUF tensor
    (transformers' ``_reverse_permute_weights``)."""
    head_half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, head_half, 2).swapaxes(1, 2).reshape(rows)


@dataclass(frozen=True)
class Use:
    """A node reading a candidate initializer: a MatMul (as its weight) or a Gather (as its
    table; through ``transpose``, a Transpose of a MatMul weight, in the builder's tied
    embedding)."""

    kind: Orientation
    node: Any
    transpose: Any = None


def find_candidates(graph: Any) -> tuple[list[Candidate], dict[str, list[Use]]]:
    """2-D float initializers read only by MatMul (as the weight) and Gather (as the table,
    directly or through a Transpose), in one consistent orientation; and those reads."""
    from onnx import TensorProto, numpy_helper

    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    for name in subgraph_reads(graph):  # a weight an If/Loop body reads stays as it is
        consumers.setdefault(name, []).append((None, -1))
    outputs = {o.name for o in graph.output}
    found: list[Candidate] = []
    uses: dict[str, list[Use]] = {}
    for init in graph.initializer:
        if len(init.dims) != 2 or init.data_type != TensorProto.FLOAT:
            continue
        reads = _reads(consumers.get(init.name, []), consumers, outputs)
        orientations = {orientation for orientation, _ in reads}
        if len(orientations) != 1:
            continue
        if init.raw_data:  # read-only, one copy of the bytes (to_array would make two)
            array = np.frombuffer(init.raw_data, dtype="<f4").reshape(tuple(init.dims))
        else:
            array = numpy_helper.to_array(init)
        found.append(Candidate(init.name, orientations.pop(), array))
        uses[init.name] = [use for _, use in reads]
    return found, uses


def _reads(
    readers: list[tuple[Any, int]],
    consumers: dict[str, list[tuple[Any, int]]],
    outputs: set[str],
) -> list[tuple[Orientation, Use]]:
    """How each reader uses an initializer (its storage orientation and the use); empty when
    one of them is anything else."""
    found: list[tuple[Orientation, Use]] = []
    for node, index in readers:
        kind = use_kind(node, index)
        if kind is not None:
            found.append((kind, Use(kind, node)))
        elif _is_transpose_2d(node) and node.output[0] not in outputs:
            gathers = consumers.get(node.output[0], [])
            if not gathers or any(use_kind(g, i) != "gather" for g, i in gathers):
                return []
            found.extend(("matmul", Use("gather", g, node)) for g, _ in gathers)
        else:
            return []
    return found


def use_kind(node: Any, index: int) -> Orientation | None:
    """How a node uses an initializer: as a MatMul weight, a Gather table, or otherwise."""
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul" and index == 1:
        return "matmul"
    if node.op_type == "Gather" and index == 0:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        return "gather" if axis == 0 else None
    return None


def _is_transpose_2d(node: Any) -> bool:
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return False
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
    return perm == [1, 0]


def subgraph_reads(graph: Any) -> set[str]:
    """Every value name read inside the subgraphs (If / Loop / Scan bodies) of ``graph``."""
    from onnx import AttributeProto

    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == AttributeProto.GRAPH else []
            bodies += list(attr.graphs) if attr.type == AttributeProto.GRAPHS else []
            for body in bodies:
                names.update(name for inner in body.node for name in inner.input)
                names.update(subgraph_reads(body))
    return names


def match_weights(candidates: list[Candidate], gguf_file: GGUFFile) -> list[Match]:
    """Which GGUF tensor(s) each candidate holds. A GGUF tensor may match several candidates
    (the TorchScript exporter stores a tied embedding twice; a fused gate_up holds the builder's
    gate and up weights as two row ranges); a candidate matches one tensor, consecutive segments
    of several (a packed qkv weight), or a row range of one."""
    heads = {
        h
        for h in (
            gguf_file.meta_int("attention.head_count"),
            gguf_file.meta_int("attention.head_count_kv"),
        )
        if h
    }
    widths = {cand.rows_shape[1] for cand in candidates}
    by_shape: dict[tuple[int, int], list[tuple[Candidate, tuple[float, float]]]] = {}
    cand_signatures: dict[str, tuple[float, float]] = {}
    for cand in candidates:
        cand_signatures[cand.name] = _signature(cand.array)
        by_shape.setdefault(cand.rows_shape, []).append((cand, cand_signatures[cand.name]))
    matches: list[Match] = []
    taken: set[str] = set()
    signatures: dict[str, tuple[float, float]] = {}
    for tensor in gguf_file.tensors.values():
        if len(tensor.shape) != 2 or tensor.shape[1] not in widths:
            continue
        try:
            dense = tensor.dequantize()
        except NotImplementedError:  # a block type the gguf package cannot read: stays fp32
            continue
        signature = signatures[tensor.name] = _signature(dense)
        pool = by_shape.get((tensor.shape[0], tensor.shape[1]), [])
        for cand, cand_signature in pool:
            if cand.name in taken or not _close(signature, cand_signature):
                continue
            order = _row_order(cand.rows(), dense, heads)
            if order is False:
                continue
            matches.append(Match(tensor.name, cand.name, cand.orientation, order))
            taken.add(cand.name)
        del dense
    for cand in candidates:
        if cand.name not in taken:
            segments = _segments(cand, gguf_file, signatures, heads)
            matches.extend(segments)
            if segments:
                taken.add(cand.name)
    prefixes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for cand in candidates:
        if cand.name not in taken:
            own = cand_signatures[cand.name]
            ranged = _row_range(cand, own, gguf_file, signatures, heads, prefixes)
            if ranged is not None:
                matches.append(ranged)
    return matches


def _segments(
    cand: Candidate,
    gguf_file: GGUFFile,
    signatures: dict[str, tuple[float, float]],
    heads: set[int],
) -> list[Match]:
    """The candidate's rows as consecutive whole GGUF tensors (at least two), else ``[]``."""
    rows = cand.rows()
    total, width = rows.shape
    names = [
        name
        for name, signature in signatures.items()
        if gguf_file.tensors[name].shape[1] == width and gguf_file.tensors[name].shape[0] < total
    ]
    if not names:
        return []
    abs_prefix, sq_prefix = _row_prefix_sums(rows)
    found: list[Match] = []
    start = 0
    while start < total:
        hit = None
        for name in names:
            n = gguf_file.tensors[name].shape[0]
            if start + n > total or any(m.tensor == name for m in found):
                continue
            part = (
                float(abs_prefix[start + n] - abs_prefix[start]),
                float(sq_prefix[start + n] - sq_prefix[start]),
            )
            if not _close(part, signatures[name]):
                continue
            dense = gguf_file.tensors[name].dequantize()
            order = _row_order(rows[start : start + n], dense, heads)
            if order is not False:
                hit = Match(name, cand.name, cand.orientation, order, (start, start + n))
                break
        if hit is None:
            return []
        found.append(hit)
        start += gguf_file.tensors[hit.tensor].shape[0]
    return found if len(found) > 1 else []


def _row_range(
    cand: Candidate,
    cand_signature: tuple[float, float],
    gguf_file: GGUFFile,
    signatures: dict[str, tuple[float, float]],
    heads: set[int],
    prefixes: dict[str, tuple[np.ndarray, np.ndarray]],
) -> Match | None:
    """The candidate's rows as a contiguous row range of one GGUF tensor with the same ``K``
    and more rows (in order, or permuted within the range), else None.

    A range's signature is a difference of the tensor's row prefix sums, so every start is
    checked at once; only starts whose sums agree are compared row by row. ``prefixes`` keeps
    the prefix sums of the tensors already scanned (the gate and up weights share one tensor).
    """
    n, width = cand.rows_shape
    for name, signature in signatures.items():
        tensor = gguf_file.tensors[name]
        total = tensor.shape[0]
        if tensor.shape[1] != width or total <= n:
            continue
        pairs = zip(cand_signature, signature, strict=True)
        if any(part > whole * (1 + 1e-6) for part, whole in pairs):
            continue  # a part of the tensor cannot outweigh the whole
        if name not in prefixes:
            prefixes[name] = _row_prefix_sums(tensor.dequantize())
        abs_prefix, sq_prefix = prefixes[name]
        window_abs = abs_prefix[n:] - abs_prefix[:-n]
        window_sq = sq_prefix[n:] - sq_prefix[:-n]
        agree = _close_all(window_abs, cand_signature[0]) & _close_all(window_sq, cand_signature[1])
        rows = None
        for start in np.flatnonzero(agree).tolist():
            if rows is None:
                rows = cand.rows()
            order = _row_order(rows, tensor.dequantize(slice(start, start + n)), heads)
            if order is False:
                continue
            within = np.arange(n, dtype=np.int64) if order is None else order
            return Match(
                name, cand.name, cand.orientation, start + within, None, (start, start + n)
            )
    return None


def _close_all(values: np.ndarray, target: float) -> np.ndarray:
    """:func:`_close`, one value against many."""
    scale = np.maximum(np.maximum(np.abs(values), abs(target)), 1e-12)
    agree: np.ndarray = np.abs(values - target) <= 1e-6 * scale
    return agree


def _row_prefix_sums(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 prefix sums over rows of ``|x|`` and ``x**2`` (``[N + 1]`` each)."""
    abs_rows = np.empty(rows.shape[0], dtype=np.float64)
    sq_rows = np.empty(rows.shape[0], dtype=np.float64)
    step = max(1, _CHUNK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        wide = rows[start : start + step].astype(np.float64)
        abs_rows[start : start + step] = np.abs(wide).sum(axis=1)
        sq_rows[start : start + step] = np.square(wide).sum(axis=1)
    zero = np.zeros(1, dtype=np.float64)
    return np.concatenate([zero, np.cumsum(abs_rows)]), np.concatenate([zero, np.cumsum(sq_rows)])
