"""GGUF block layouts: every block type whose values are ``scale * (code - zero) + offset``.

A GGUF tensor row is a run of blocks along the input dimension; the legacy types have 32
elements per block, the K-quants 256-element super-blocks of 16 or 32-element sub-blocks, each
with its own scale (and offset). :func:`split_blocks` turns the raw bytes of any of them into
one common form, one (sub-)block per entry: unsigned integer codes ``q`` in ``0 .. 2**bits - 1``,
a type constant ``zero``, and per-block ``scale`` and ``offset``:

======  ====  =====  ======  =============================  ===========================
type    bits  block  zero    scale                          offset
======  ====  =====  ======  =============================  ===========================
Q4_0    4     32     8       ``d``                          -
Q4_1    4     32     0       ``d``                          ``m``
Q5_0    5     32     16      ``d``                          -
Q5_1    5     32     0       ``d``                          ``m``
Q8_0    8     32     128     ``d``                          -
Q2_K    2     16     0       ``d * sc`` (sc: 4 bits)        ``-dmin * mn`` (mn: 4 bits)
Q3_K    3     16     4       ``d * (sc - 32)`` (6 bits)     -
Q4_K    4     32     0       ``d * sc`` (6 bits)            ``-dmin * mn`` (6 bits)
Q5_K    5     32     0       ``d * sc`` (6 bits)            ``-dmin * mn`` (6 bits)
Q6_K    6     16     32      ``d * sc`` (signed 8 bits)     -
======  ====  =====  ======  =============================  ===========================

``d``, ``dmin`` and ``m`` are the file's float16 values (one per block, or per 256-element
super-block for the K-quants). A scale or offset is computed in float32 and is exact: a float16
significand (11 bits) times an integer of at most 8 bits fits float32's 24. So is a scale times a
centred code (at most 23 bits), and :meth:`GGUFBlocks.dequantize` reproduces the ``gguf``
package's own numpy dequantization bit for bit (it rounds once, where it adds the offset, as the
package does).

Q8_0's signed codes are stored shifted (``q + 128``, zero 128) and Q3_K's (``q + 4``, zero 4),
so every code is unsigned. The decoding below mirrors ``gguf/quants.py`` line by line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Elements of a K-quant super-block.
QK_K = 256

#: Block types :func:`split_blocks` reads: bytes per block (per super-block for the K-quants).
TYPE_SIZES: dict[str, int] = {
    "Q4_0": 18,
    "Q4_1": 20,
    "Q5_0": 22,
    "Q5_1": 24,
    "Q8_0": 34,
    "Q2_K": 84,
    "Q3_K": 110,
    "Q4_K": 144,
    "Q5_K": 176,
    "Q6_K": 210,
}

#: Elements per block of the file (a super-block for the K-quants).
TYPE_ELEMENTS: dict[str, int] = {name: (QK_K if name.endswith("_K") else 32) for name in TYPE_SIZES}

#: Code width of each type: up to 4 bits a code fits one 4-bit MatMulNBits, wider ones do not.
CODE_BITS: dict[str, int] = {
    "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8,
    "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6,
}  # fmt: skip


@dataclass(frozen=True)
class BlockValues:
    """A float32 ``[rows, n_blocks]`` per-block quantity, kept as the file stores it: ``base``
    (float16 from the file, or float32 for requantized weights) per group of consecutive blocks,
    times an integer ``factor`` per block (a K-quant's sub-block scale), or ``base`` alone.

    Kept factored so that the ONNX file stays as small as the GGUF: the graph computes the
    float32 product (folded into one initializer when the session loads), exactly like
    :meth:`values`.
    """

    base: np.ndarray  # float16 / float32 [rows, n_groups]
    factor: np.ndarray | None = None  # int8 / uint8 [rows, n_blocks]

    @property
    def rows(self) -> int:
        return int(self.base.shape[0])

    @property
    def n_blocks(self) -> int:
        return int((self.base if self.factor is None else self.factor).shape[1])

    @property
    def group(self) -> int:
        """Blocks per ``base`` value (1 without a factor)."""
        return self.n_blocks // int(self.base.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.base.nbytes) + (0 if self.factor is None else int(self.factor.nbytes))

    def values(self, rows: slice | None = None) -> np.ndarray:
        """float32 ``[rows, n_blocks]``: ``float32(base) * float32(factor)`` (exact)."""
        pick = slice(None) if rows is None else rows
        base = self.base[pick].astype(np.float32)
        if self.factor is None:
            return base
        factor = self.factor[pick].astype(np.float32)
        grouped = factor.reshape(factor.shape[0], base.shape[1], self.group) * base[..., None]
        return np.asarray(grouped.reshape(factor.shape), dtype=np.float32)

    def take(self, order: np.ndarray) -> BlockValues:
        """The same values with row ``i`` taken from row ``order[i]``."""
        return BlockValues(self.base[order], None if self.factor is None else self.factor[order])


@dataclass(frozen=True)
class GGUFBlocks:
    """The blocks of a GGUF tensor, one row of (sub-)blocks per tensor row: element ``j`` of
    block ``b`` of row ``r`` is ``scales[r, b] * (codes[r, b, j] - zero) + offsets[r, b]``."""

    ggml_type: str
    codes: np.ndarray  # uint8 [rows, n_blocks, block_size], unsigned, in element order
    bits: int  # code width: codes are < 2**bits
    zero: int
    scales: BlockValues
    offsets: BlockValues | None = None

    @property
    def rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.codes.shape[1])

    @property
    def block_size(self) -> int:
        return int(self.codes.shape[2])

    def dequantize(self, rows: slice | None = None) -> np.ndarray:
        """float32 ``[rows, n_blocks * block_size]``, as the ``gguf`` package computes it."""
        pick = slice(None) if rows is None else rows
        centred = self.codes[pick].astype(np.float32) - np.float32(self.zero)
        values = centred * self.scales.values(rows)[..., None]
        if self.offsets is not None:
            values = values + self.offsets.values(rows)[..., None]
        return np.asarray(values.reshape(values.shape[0], -1), dtype=np.float32)

    def permute_rows(self, order: np.ndarray) -> GGUFBlocks:
        """The same blocks with row ``i`` taken from row ``order[i]``."""
        return GGUFBlocks(
            self.ggml_type,
            self.codes[order],
            self.bits,
            self.zero,
            self.scales.take(order),
            None if self.offsets is None else self.offsets.take(order),
        )


def split_blocks(raw: np.ndarray, ggml_type: str, *, rows: int | None = None) -> GGUFBlocks:
    """Split raw bytes (``[rows, bytes_per_row]`` or flat) of one of :data:`TYPE_SIZES`."""
    if ggml_type not in TYPE_SIZES:
        raise ValueError(f"{ggml_type} is not one of {sorted(TYPE_SIZES)}")
    data = np.ascontiguousarray(raw).view(np.uint8)
    n_rows = rows if rows is not None else (data.shape[0] if data.ndim > 1 else 1)
    blocks = data.reshape(-1, TYPE_SIZES[ggml_type])
    split = _SPLITTERS[ggml_type]
    codes, bits, zero, scales, offsets = split(blocks)

    def per_row(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array.reshape(n_rows, -1))

    def values(pair: tuple[np.ndarray, np.ndarray | None] | None) -> BlockValues | None:
        if pair is None:
            return None
        base, factor = pair
        return BlockValues(per_row(base), None if factor is None else per_row(factor))

    block_size = codes.shape[-1]
    scale_values = values(scales)
    assert scale_values is not None
    return GGUFBlocks(
        ggml_type,
        np.ascontiguousarray(codes.reshape(n_rows, -1, block_size)),
        bits,
        zero,
        scale_values,
        values(offsets),
    )


# --------------------------------------------------------------------------------------------
# One decoder per type: [n, type_size] uint8 blocks → codes [n, n_sub, sub], bits, zero,
# (scale base, scale factor), (offset base, offset factor) or None.
# --------------------------------------------------------------------------------------------

_Pair = tuple[np.ndarray, np.ndarray | None]
_Split = tuple[np.ndarray, int, int, _Pair, _Pair | None]


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte ``start`` of every block, ``[n, 1]``."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16)


def _halves(qs: np.ndarray) -> np.ndarray:
    """Legacy 4-bit packing: byte ``j`` holds element ``j`` (low) and ``j + 16`` (high)."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1: bit ``i`` of the little-endian uint32 ``qh`` is bit 4 of element ``i``."""
    words = np.ascontiguousarray(qh).view("<u4")  # [n, 1]
    shifts = np.arange(32, dtype=np.uint32).reshape(1, 32)
    return ((words >> shifts) & np.uint32(1)).astype(np.uint8)


def _q4_0(blocks: np.ndarray) -> _Split:
    codes = _halves(blocks[:, 2:18])
    return codes[:, None], 4, 8, (_f16(blocks, 0), None), None


def _q4_1(blocks: np.ndarray) -> _Split:
    codes = _halves(blocks[:, 4:20])
    return codes[:, None], 4, 0, (_f16(blocks, 0), None), (_f16(blocks, 2), None)


def _q5_0(blocks: np.ndarray) -> _Split:
    codes = _halves(blocks[:, 6:22]) | (_high_bits(blocks[:, 2:6]) << np.uint8(4))
    return codes[:, None], 5, 16, (_f16(blocks, 0), None), None


def _q5_1(blocks: np.ndarray) -> _Split:
    codes = _halves(blocks[:, 8:24]) | (_high_bits(blocks[:, 4:8]) << np.uint8(4))
    return codes[:, None], 5, 0, (_f16(blocks, 0), None), (_f16(blocks, 2), None)


def _q8_0(blocks: np.ndarray) -> _Split:
    codes = (blocks[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes[:, None], 8, 128, (_f16(blocks, 0), None), None


def _q2_k(blocks: np.ndarray) -> _Split:
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = ((qs.reshape(n, -1, 1, 32) >> shifts) & np.uint8(3)).reshape(n, 16, 16)
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    return codes, 2, 0, (d, scales & np.uint8(0x0F)), (-dmin, scales >> np.uint8(4))


def _q3_k(blocks: np.ndarray) -> _Split:
    n = blocks.shape[0]
    hmask, qs, packed = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    low = packed[:, :8].reshape(n, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
    high = packed[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)
    sc = (low.reshape(n, 16) & np.uint8(0x0F)) | ((high.reshape(n, 16) & np.uint8(3)) << 4)
    factor = (sc.astype(np.int8) - np.int8(32)).astype(np.int8)
    ql = qs.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = hmask.reshape(n, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    ql = ql.reshape(n, 16, 16) & np.uint8(3)
    qh = qh.reshape(n, 16, 16) & np.uint8(1)
    # gguf: q = ql - 4 * (1 - h) in -4..3; stored as q + 4 = ql + 4h, zero 4
    codes = ql | (qh << np.uint8(2))
    return codes, 3, 4, (_f16(blocks, 108), factor), None


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: eight 6-bit scales and eight 6-bit minimums from 12 bytes."""
    n = packed.shape[0]
    d, m, m_d = np.split(packed.reshape(n, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(n, 8).astype(np.uint8), mn.reshape(n, 8).astype(np.uint8)


def _q4_k(blocks: np.ndarray) -> _Split:
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    qs = blocks[:, 16:144].reshape(n, -1, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & np.uint8(0x0F)).reshape(n, 8, 32)
    return codes, 4, 0, (_f16(blocks, 0), sc), (-_f16(blocks, 2), mn)


def _q5_k(blocks: np.ndarray) -> _Split:
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    qh, qs = blocks[:, 16:48], blocks[:, 48:176]
    ql = qs.reshape(n, -1, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    hi = qh.reshape(n, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    ql = (ql & np.uint8(0x0F)).reshape(n, 8, 32)
    hi = (hi & np.uint8(1)).reshape(n, 8, 32)
    codes = ql | (hi << np.uint8(4))
    return codes, 5, 0, (_f16(blocks, 0), sc), (-_f16(blocks, 2), mn)


def _q6_k(blocks: np.ndarray) -> _Split:
    n = blocks.shape[0]
    ql, qh, scales = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
    ql = ql.reshape(n, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & np.uint8(0x0F)).reshape(n, -1, 32)
    qh = qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(3)).reshape(n, -1, 32)
    codes = (ql | (qh << np.uint8(4))).reshape(n, 16, 16)
    factor = np.ascontiguousarray(scales).view(np.int8)
    return codes, 6, 32, (_f16(blocks, 208), factor), None


_SPLITTERS = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
