"""GGUF blocks → ONNX Runtime block-quantized operators (MatMulNBits, GatherBlockQuantized).

Three steps, used by the ``gguf_blocks`` pass:

1. :func:`match_weights` finds, by content, which GGUF tensor each MatMul weight and Gather
   table of an fp32 export holds (the TorchScript exporter renames and transposes weights, and
   llama q/k rows come out permuted relative to the GGUF file).
2. :func:`pack_exact` turns Q4_0 / Q4_1 / Q8_0 blocks into MatMulNBits tensors without touching a
   value; :func:`pack_rtn` requantizes anything else (round to nearest, asymmetric, per block).
3. :class:`Rewriter` replaces the nodes.

Every pack uses ONNX Runtime's *default* zero point (8 for 4 bits, 128 for 8 bits) or uint8
zero points, never float ones: MatMulNBits with float zero points skips weight prepacking and
dequantizes the whole matrix on every call (measured 4x slower than fp32 on SmolLM2's LM head).
A Q4_1 block ``w = d*q + m`` is therefore written ``d*(q - 8) + c`` with ``c = m + 8d``: the
first term is a plain symmetric MatMulNBits, the second a small exact correction
``blocksum(x) @ c^T`` (1/32 of the multiply-adds; ~10% of SmolLM2's run time on 64-token
inputs), with ``m`` stored as the file's float16 values and ``c`` computed in the graph
(constant-folded when the session loads).

8-bit weights (Q8_0, 8-bit fallback) below ``accuracy_level`` 4 are not MatMulNBits at all:
MLAS has no fp32-activation 8-bit kernel, so ONNX Runtime would dequantize them on every call
(~10x slower than fp32). They are stored as 8-bit codes + scales and expanded by constant folding
when the session loads (exact; fp32 memory at run time, 8-bit size on disk).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from slmops_optimizer.gguf.reader import BLOCK_ELEMENTS, GGUFBlocks, GGUFFile, GGUFTensor

MS_DOMAIN = "com.microsoft"
Orientation = Literal["matmul", "gather"]


# --------------------------------------------------------------------------------------------
# Packs: the initializers of one block-quantized weight, rows = output features (N), K inputs.
# --------------------------------------------------------------------------------------------


@dataclass
class WeightPack:
    """MatMulNBits tensors of a ``[N, K]`` weight (rows are outputs, as in the GGUF file).

    The value of element ``k`` of row ``n`` in block ``b = k // block_size`` is
    ``scales[n, b] * (code - zp) + (offsets[b, n] if offsets else 0)``, ``zp`` being the uint8
    zero point or ONNX Runtime's default ``2**(bits-1)``.
    """

    source_type: str  # the GGUF block type ("Q4_1", "Q6_K", "F16"...)
    exact: bool
    bits: int
    block_size: int
    n: int
    k: int
    codes: np.ndarray  # uint8 [N, n_blocks, block_size * bits / 8], ORT nibble order
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None = None  # uint8 [N, ceil(n_blocks * bits / 8)] (packed)
    mins_t: np.ndarray | None = None  # float16 [n_blocks, N]: Q4_1 m, transposed

    @property
    def n_blocks(self) -> int:
        return int(self.scales.shape[1])

    @property
    def nbytes(self) -> int:
        arrays = [self.codes, self.scales, self.zero_points, self.mins_t]
        return sum(int(a.nbytes) for a in arrays if a is not None)

    def zero_point_values(self) -> np.ndarray:
        """uint8 ``[N, n_blocks]`` zero points, unpacked (the default when none are stored)."""
        if self.zero_points is None:
            return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)
        if self.bits == 8:
            return self.zero_points[:, : self.n_blocks]
        pairs = np.stack([self.zero_points & 0x0F, self.zero_points >> 4], axis=-1)
        return pairs.reshape(self.n, -1)[:, : self.n_blocks]

    def offsets(self) -> np.ndarray | None:
        """float32 ``[N, n_blocks]`` additive block offsets ``m + 8d`` (Q4_1), as the graph
        computes them."""
        if self.mins_t is None:
            return None
        return self.mins_t.T.astype(np.float32) + self.scales * np.float32(8)

    def dequantize(self) -> np.ndarray:
        """float32 ``[N, K]``: what MatMulNBits multiplies by (with fp32 compute)."""
        codes = unpack_codes(self.codes, self.bits).astype(np.float32)
        zp = self.zero_point_values().astype(np.float32)[..., None]
        values = (codes - zp) * self.scales[..., None]
        offsets = self.offsets()
        if offsets is not None:
            values = values + offsets[..., None]
        return np.asarray(values.reshape(self.n, -1)[:, : self.k], dtype=np.float32)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 ``[..., 2j]`` / ``[..., 2j+1]`` → low / high nibble of byte ``j``."""
    codes = codes.astype(np.uint8)
    packed: np.ndarray = codes[..., 0::2] | (codes[..., 1::2] << np.uint8(4))
    return packed.astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def pack_exact(blocks: GGUFBlocks) -> WeightPack:
    """The same codes and scales as the file: Q4_0 and Q4_1 as 4-bit, Q8_0 as 8-bit."""
    n, n_blocks = blocks.rows, blocks.n_blocks
    k = n_blocks * BLOCK_ELEMENTS
    scales = np.ascontiguousarray(blocks.scales, dtype=np.float32)
    if blocks.ggml_type == "Q8_0":
        codes = (blocks.codes.astype(np.int16) + 128).astype(np.uint8)
        return WeightPack("Q8_0", True, 8, BLOCK_ELEMENTS, n, k, codes, scales)
    codes = pack_nibbles(blocks.codes)
    if blocks.ggml_type == "Q4_0":
        return WeightPack("Q4_0", True, 4, BLOCK_ELEMENTS, n, k, codes, scales)
    assert blocks.mins is not None
    mins_t = np.ascontiguousarray(blocks.mins.T.astype(np.float16))  # exact: the file's f16
    return WeightPack("Q4_1", True, 4, BLOCK_ELEMENTS, n, k, codes, scales, mins_t=mins_t)


def pack_rtn(weight: np.ndarray, bits: int, block_size: int, source_type: str) -> WeightPack:
    """Round-to-nearest, asymmetric, per block of ``block_size`` along K, uint8 zero points."""
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, n_blocks, block_size)
    qmax = (1 << bits) - 1
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scales = ((hi - lo) / qmax).astype(np.float32)
    scales[scales == 0] = 1.0
    zp = np.clip(np.rint(-lo / scales), 0, qmax).astype(np.uint8)
    q = np.clip(np.rint(blocks / scales[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
    if bits == 8:
        codes, zero_points = q, zp
    else:
        codes = pack_nibbles(q)
        zp_even = np.zeros((n, n_blocks + (n_blocks & 1)), dtype=np.uint8)
        zp_even[:, :n_blocks] = zp
        zero_points = pack_nibbles(zp_even)
    return WeightPack(source_type, False, bits, block_size, n, k, codes, scales, zero_points)


# --------------------------------------------------------------------------------------------
# Matching ONNX initializers to GGUF tensors by content.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """ONNX initializer ``initializer`` holds GGUF tensor ``tensor``: with ``rows`` the
    initializer as ``[N, K]`` (transposed for a MatMul weight), ``rows[i] == gguf[order[i]]``
    (``order`` None: same order)."""

    tensor: str
    initializer: str
    orientation: Orientation
    order: np.ndarray | None = field(default=None, compare=False)

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
    """Invariant under row permutation and transposition."""
    flat = values.astype(np.float64, copy=False).ravel()
    return float(np.abs(flat).sum()), float(np.square(flat).sum())


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


def match_weights(candidates: list[Candidate], gguf_file: GGUFFile) -> list[Match]:
    """Which GGUF tensor each candidate holds. A GGUF tensor may match several candidates (the
    TorchScript exporter stores a tied embedding twice); a candidate matches at most one."""
    heads = {
        h
        for h in (
            gguf_file.meta_int("attention.head_count"),
            gguf_file.meta_int("attention.head_count_kv"),
        )
        if h
    }
    by_shape: dict[tuple[int, int], list[tuple[Candidate, tuple[float, float]]]] = {}
    for cand in candidates:
        by_shape.setdefault(cand.rows_shape, []).append((cand, _signature(cand.array)))
    matches: list[Match] = []
    taken: set[str] = set()
    for tensor in gguf_file.tensors.values():
        if len(tensor.shape) != 2:
            continue
        pool = by_shape.get((tensor.shape[0], tensor.shape[1]), [])
        pool = [entry for entry in pool if entry[0].name not in taken]
        if not pool:
            continue
        try:
            dense = tensor.dequantize()
        except NotImplementedError:  # a block type the gguf package cannot read: stays fp32
            continue
        signature = _signature(dense)
        for cand, cand_signature in pool:
            if not _close(signature, cand_signature):
                continue
            order = _row_order(cand.rows(), dense, heads)
            if order is False:
                continue
            matches.append(Match(tensor.name, cand.name, cand.orientation, order))
            taken.add(cand.name)
    return matches


# --------------------------------------------------------------------------------------------
# Graph rewriting.
# --------------------------------------------------------------------------------------------


@dataclass
class PackNames:
    codes: str
    scales: str
    zero_points: str | None = None
    mins_t: str | None = None
    offsets: str | None = None  # value name of c = m + 8d, [N, n_blocks] (built on demand)
    offsets_t: str | None = None  # value name of c^T, [n_blocks, N]
    scales_3d: str | None = None  # value name of scales as [N, n_blocks, 1] (GatherBQ)
    zero_points_3d: str | None = None


class Rewriter:
    """Replaces MatMul / Gather nodes of an ONNX graph by block-quantized ones, sharing every
    pack's initializers between all the nodes that use it."""

    def __init__(self, graph: Any, accuracy_level: int | None) -> None:
        self.graph = graph
        self.accuracy_level = accuracy_level
        self.expand_8bit = accuracy_level != 4  # see the module docstring
        self.initializers: list[Any] = []
        self._names: dict[int, PackNames] = {}
        self._used: set[str] = {i.name for i in graph.initializer}
        self._used.update(n for node in graph.node for n in node.output)
        self._used.update(i.name for i in graph.input)
        self._blocksum: dict[tuple[str, int, int], str] = {}
        self._block_matrix: dict[tuple[int, int], str] = {}
        self._counter = 0

    # -- names and constants ------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        name = base
        while name in self._used:
            self._counter += 1
            name = f"{base}_{self._counter}"
        self._used.add(name)
        return name

    def constant(self, base: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, domain: str = "", **attrs: Any) -> Any:
        from onnx import helper

        output = self.fresh(base)
        made = helper.make_node(op, inputs, [output], name=self.fresh(f"{base}/{op}"), **attrs)
        if domain:
            made.domain = domain
        return made

    def pack_names(self, pack: WeightPack, base: str) -> PackNames:
        names = self._names.get(id(pack))
        if names is None:
            bits = f"q{pack.bits}"
            names = PackNames(
                codes=self.constant(f"{base}.{bits}", pack.codes),
                scales=self.constant(f"{base}.scales", pack.scales),
            )
            if pack.zero_points is not None:
                names.zero_points = self.constant(f"{base}.zero_points", pack.zero_points)
            if pack.mins_t is not None:
                names.mins_t = self.constant(f"{base}.mins_t", pack.mins_t)
            self._names[id(pack)] = names
        return names

    # -- Q4_1 offsets -------------------------------------------------------------------------

    def _offsets_t(self, pack: WeightPack, names: PackNames, base: str, out: list[Any]) -> str:
        """``c^T = m^T + 8 d^T`` ``[n_blocks, N]`` (float32), built once per pack."""
        from onnx import TensorProto

        if names.offsets_t is None:
            assert names.mins_t is not None
            mins = self.node("Cast", [names.mins_t], f"{base}.mins_f32", to=TensorProto.FLOAT)
            scales_t = self.node("Transpose", [names.scales], f"{base}.scales_t", perm=[1, 0])
            eight = self.constant(f"{base}.eight", np.asarray(8.0, dtype=np.float32))
            shift = self.node("Mul", [scales_t.output[0], eight], f"{base}.shift_t")
            offsets_t = self.node("Add", [mins.output[0], shift.output[0]], f"{base}.offsets_t")
            out.extend([mins, scales_t, shift, offsets_t])
            names.offsets_t = offsets_t.output[0]
        return names.offsets_t

    def _offsets(self, pack: WeightPack, names: PackNames, base: str, out: list[Any]) -> str:
        """``c`` ``[N, n_blocks]``, for the embedding rows."""
        if names.offsets is None:
            offsets_t = self._offsets_t(pack, names, base, out)
            offsets = self.node("Transpose", [offsets_t], f"{base}.offsets", perm=[1, 0])
            out.append(offsets)
            names.offsets = offsets.output[0]
        return names.offsets

    def _block_sums(self, x: str, k: int, block_size: int, out: list[Any]) -> str:
        """``[..., K]`` → ``[..., K / block_size]`` sums, once per input value."""
        key = (x, k, block_size)
        if key not in self._blocksum:
            if (k, block_size) not in self._block_matrix:
                n_blocks = -(-k // block_size)
                ones = np.zeros((k, n_blocks), dtype=np.float32)
                ones[np.arange(k), np.arange(k) // block_size] = 1.0
                self._block_matrix[(k, block_size)] = self.constant(
                    f"gguf_blocks.block_sum_{k}x{block_size}", ones
                )
            summed = self.node(
                "MatMul", [x, self._block_matrix[(k, block_size)]], "gguf_blocks.block_sums"
            )
            out.append(summed)
            self._blocksum[key] = summed.output[0]
        return self._blocksum[key]

    # -- replacements -------------------------------------------------------------------------

    def matmul(self, node: Any, pack: WeightPack, base: str) -> list[Any]:
        """``Y = X @ W`` → MatMulNBits (+ the exact Q4_1 block-offset correction)."""
        names = self.pack_names(pack, base)
        if pack.bits == 8 and self.expand_8bit:
            return self._dense_matmul(node, pack, names, base)
        out: list[Any] = []
        x, y = node.input[0], node.output[0]
        inputs = [x, names.codes, names.scales]
        if names.zero_points is not None:
            inputs.append(names.zero_points)
        attrs: dict[str, Any] = {
            "K": pack.k,
            "N": pack.n,
            "bits": pack.bits,
            "block_size": pack.block_size,
        }
        if self.accuracy_level is not None:
            attrs["accuracy_level"] = self.accuracy_level
        main = self.node("MatMulNBits", inputs, f"{base}.matmul", domain=MS_DOMAIN, **attrs)
        if pack.mins_t is None:
            main.output[0] = y
            out.append(main)
            return out
        out.append(main)
        sums = self._block_sums(x, pack.k, pack.block_size, out)
        offsets_t = self._offsets_t(pack, names, base, out)
        correction = self.node("MatMul", [sums, offsets_t], f"{base}.offset_correction")
        add = self.node("Add", [main.output[0], correction.output[0]], f"{base}.matmul_exact")
        add.output[0] = y
        out.extend([correction, add])
        return out

    def _dense_matmul(self, node: Any, pack: WeightPack, names: PackNames, base: str) -> list[Any]:
        """``Y = X @ W`` with ``W = (codes - zp) * scales`` built from the stored 8-bit codes by
        nodes on initializers only: ONNX Runtime folds them into one fp32 weight at load (exact:
        an 8-bit code times a float16 scale fits a float32), then runs its fp32 GEMM."""
        from onnx import TensorProto

        out: list[Any] = []
        codes = self.node("Cast", [names.codes], f"{base}.codes_f32", to=TensorProto.FLOAT)
        out.append(codes)
        if names.zero_points is None:
            zp_name = self.constant(f"{base}.zero_point", np.asarray(128.0, dtype=np.float32))
        else:
            zp_cast = self.node("Cast", [names.zero_points], f"{base}.zp_f32", to=TensorProto.FLOAT)
            zp_axis = self.constant(f"{base}.zp_axis", np.asarray([-1], dtype=np.int64))
            zp_col = self.node("Unsqueeze", [zp_cast.output[0], zp_axis], f"{base}.zp_col")
            out.extend([zp_cast, zp_col])
            zp_name = zp_col.output[0]
        centered = self.node("Sub", [codes.output[0], zp_name], f"{base}.centered")
        axis = self.constant(f"{base}.scale_axis", np.asarray([-1], dtype=np.int64))
        scale_col = self.node("Unsqueeze", [names.scales, axis], f"{base}.scale_col")
        scaled = self.node("Mul", [centered.output[0], scale_col.output[0]], f"{base}.scaled")
        out.extend([centered, scale_col, scaled])
        shape = self.constant(
            f"{base}.rows_shape", np.asarray([pack.n, pack.n_blocks * pack.block_size], np.int64)
        )
        rows = self.node("Reshape", [scaled.output[0], shape], f"{base}.rows")
        out.append(rows)
        dense = rows.output[0]
        if pack.n_blocks * pack.block_size != pack.k:
            starts = self.constant(f"{base}.slice_start", np.asarray([0], dtype=np.int64))
            ends = self.constant(f"{base}.slice_end", np.asarray([pack.k], dtype=np.int64))
            axes = self.constant(f"{base}.slice_axis", np.asarray([1], dtype=np.int64))
            sliced = self.node("Slice", [dense, starts, ends, axes], f"{base}.rows_k")
            out.append(sliced)
            dense = sliced.output[0]
        weight = self.node("Transpose", [dense], f"{base}.weight", perm=[1, 0])
        matmul = self.node("MatMul", [node.input[0], weight.output[0]], f"{base}.matmul")
        matmul.output[0] = node.output[0]
        out.extend([weight, matmul])
        return out

    def gather(self, node: Any, pack: WeightPack, base: str) -> list[Any]:
        """``E[ids]`` → GatherBlockQuantized on the ``[N, n_blocks, blob]`` codes (the very
        tensor a tied LM head's MatMulNBits reads) (+ the gathered Q4_1 block offsets)."""
        names = self.pack_names(pack, base)
        out: list[Any] = []
        ids, y = node.input[1], node.output[0]
        if names.scales_3d is None:
            shape3 = self.constant(
                f"{base}.shape_3d", np.asarray([pack.n, pack.n_blocks, 1], dtype=np.int64)
            )
            scales_3d = self.node("Reshape", [names.scales, shape3], f"{base}.scales_3d")
            out.append(scales_3d)
            names.scales_3d = scales_3d.output[0]
            if pack.zero_points is not None:
                zp = pack.zero_point_values().reshape(pack.n, pack.n_blocks, 1)
                names.zero_points_3d = self.constant(f"{base}.zero_points_3d", zp)
        inputs = [names.codes, ids, names.scales_3d]
        if names.zero_points_3d is not None:
            inputs.append(names.zero_points_3d)
        gathered = self.node(
            "GatherBlockQuantized",
            inputs,
            f"{base}.gather",
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=2,
            block_size=pack.block_size,
            bits=pack.bits,
        )
        out.append(gathered)
        blocks = gathered.output[0]  # [*ids, n_blocks, block_size]
        if pack.mins_t is not None:
            offsets = self._offsets(pack, names, base, out)
            picked = self.node("Gather", [offsets, ids], f"{base}.row_offsets", axis=0)
            minus_one = self.constant(f"{base}.last_axis", np.asarray([-1], dtype=np.int64))
            column = self.node("Unsqueeze", [picked.output[0], minus_one], f"{base}.offsets_col")
            added = self.node("Add", [blocks, column.output[0]], f"{base}.gather_exact")
            out.extend([picked, column, added])
            blocks = added.output[0]
        ids_shape = self.node("Shape", [ids], f"{base}.ids_shape")
        width = self.constant(f"{base}.width", np.asarray([pack.k], dtype=np.int64))
        shape = self.node("Concat", [ids_shape.output[0], width], f"{base}.out_shape", axis=0)
        padded_width = pack.n_blocks * pack.block_size
        if padded_width != pack.k:
            raise ValueError(f"{base}: K={pack.k} is not a multiple of block {pack.block_size}")
        reshape = self.node("Reshape", [blocks, shape.output[0]], f"{base}.embedding")
        reshape.output[0] = y
        out.extend([ids_shape, shape, reshape])
        return out


def tensor_base_name(tensor: GGUFTensor | str) -> str:
    name = tensor if isinstance(tensor, str) else tensor.name
    return f"gguf.{name.removesuffix('.weight')}"
