"""GGUF blocks → the tensors of ONNX Runtime's MatMulNBits / GatherBlockQuantized ("packs").

Used by the ``gguf_blocks`` pass with :mod:`~slmops_optimizer.gguf.matching` (which ONNX weight
holds which GGUF tensor) and :mod:`~slmops_optimizer.gguf.rewrite` (the nodes).

Every pack uses ONNX Runtime's *default* zero point ``mid`` (8 for 4 bits, 128 for 8 bits),
never float zero points: MatMulNBits with float zero points skips weight prepacking and
dequantizes the whole matrix on every call (~100x slower). A GGUF block's value
``s * (q - zero) + o`` (:mod:`~slmops_optimizer.gguf.blocks`) is therefore stored as codes
``v = q + t`` with the shift ``t`` that keeps them in the container, so that

    value = s * (v - mid) + c,    c = o + e * s,    e = mid - t - zero,

the first term a plain symmetric MatMulNBits, the second an exact correction
``blocksum(x) @ c^T`` (one multiply-add per block, computed only when ``c`` is not zero). The
forms (:data:`Form`):

- ``int4``, codes of at most 4 bits (Q4_0, Q4_1, Q4_K, Q3_K, Q2_K): one 4-bit MatMulNBits.
  Q3_K and Q2_K fit with ``e = 0``; Q4_1 and Q4_K fill all 16 codes, so ``e = 8`` and
  ``c = o + 8s`` rounds once in float32 (the only rounding of the mapping: each mapped weight is
  then within ``2**-24 * (|c| + 2|w|)`` of the ``gguf`` package's float32 value).
- ``int8`` (wide codes: Q5_0, Q5_1, Q5_K, Q6_K, Q8_0): one 8-bit MatMulNBits, ``e = 0`` for
  every type (Q6_K ``v = q + 96``, Q5_0 ``q + 112``, Q5_1 / Q5_K ``q + 128``, Q8_0 ``q + 128``).
  ONNX Runtime's 8-bit kernel is fast only with int8 activations, so these nodes always get
  ``accuracy_level`` 4.
- ``split4`` (wide codes): ``u = q + t`` in ``0..255`` split into two 4-bit planes,
  ``u = 16 h + l``; ``16 * MatMulNBits(x, h, s) + MatMulNBits(x, l, s)`` computes
  ``s * (u - 136)`` on the fast 4-bit kernels with fp32 activations, both reading one scales
  tensor. ``e = 0`` (Q6_K ``t = 104``, Q5_0 ``120``, Q5_1 / Q5_K ``136``) except Q8_0, whose
  256 codes leave no room: ``t = 0``, ``e = 8``, ``c = 8s`` (exact).
- ``dense`` (wide codes): the ``int8`` codes, expanded to an fp32 weight by constant folding
  when the session loads (exact; fp32 memory at run time, 8-bit size on disk).

Scales and offsets stay factored as in the file (a float16 ``d`` per super-block times a small
integer per sub-block, :class:`~slmops_optimizer.gguf.blocks.BlockValues`); the graph multiplies
them out (folded at load), which keeps the ONNX file close to the GGUF's size.

:func:`pack_rtn` requantizes a weight whose blocks do not map (IQ*, F16...): round to nearest,
asymmetric, uint8 zero points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from slmops_optimizer.gguf.blocks import BlockValues, GGUFBlocks

Form = Literal["int4", "int8", "split4", "dense"]
#: How codes wider than 4 bits are computed (the config's ``wide_codes``).
WideForm = Literal["split4", "int8", "dense"]

#: ONNX Runtime's default zero point of each container, and of the split planes' sum.
_MID = {"int4": 8, "int8": 128, "dense": 128, "split4": 136}
_CONTAINER_BITS = {"int4": 4, "int8": 8, "dense": 8, "split4": 8}


@dataclass
class WeightPack:
    """MatMulNBits tensors of a ``[N, K]`` weight (rows are outputs, as in the GGUF file).

    Element ``k`` of row ``n``, in block ``b = k // block_size``, is
    ``scales[n, b] * (code - zp) + correction[n, b]``; ``code`` is the 4 or 8-bit code
    (``16 * high + low`` for ``split4``, ``zp`` then 136), ``zp`` the uint8 zero point or ONNX
    Runtime's default, ``correction = offsets + shift * scales`` (0 when neither is set).
    """

    source_type: str  # the GGUF block type ("Q4_1", "Q6_K", "F16"...)
    form: Form
    exact: bool  # the file's own codes (False: requantized)
    bits: int  # bits of each MatMulNBits / GatherBlockQuantized code: 4 or 8
    block_size: int
    n: int
    k: int
    planes: tuple[np.ndarray, ...]  # uint8 [N, n_blocks, block_size * bits / 8]: (high, low)
    scales: BlockValues
    zero_points: np.ndarray | None = None  # uint8 [N, ceil(n_blocks * bits / 8)] (requantized)
    offsets: BlockValues | None = None
    shift: int = 0

    @property
    def n_blocks(self) -> int:
        return self.scales.n_blocks

    @property
    def nbytes(self) -> int:
        arrays = [*self.planes, self.zero_points]
        total = sum(int(a.nbytes) for a in arrays if a is not None) + self.scales.nbytes
        return total + (0 if self.offsets is None else self.offsets.nbytes)

    @property
    def has_correction(self) -> bool:
        return self.offsets is not None or self.shift != 0

    @property
    def rounds(self) -> bool:
        """Whether ``correction`` rounds (an offset plus a multiple of the scale)."""
        return self.offsets is not None and self.shift != 0

    def correction(self, rows: slice | None = None) -> np.ndarray | None:
        """float32 ``[N, n_blocks]`` ``offsets + shift * scales``, computed as the graph does."""
        if not self.has_correction:
            return None
        shifted = None
        if self.shift:
            shifted = self.scales.values(rows) * np.float32(self.shift)
        if self.offsets is None:
            return shifted
        offsets = self.offsets.values(rows)
        return offsets if shifted is None else offsets + shifted

    def zero_point_values(self) -> np.ndarray:
        """uint8 ``[N, n_blocks]`` zero points, unpacked (the default when none are stored)."""
        if self.zero_points is None:
            return np.full((self.n, self.n_blocks), _MID[self.form], dtype=np.uint8)
        if self.bits == 8:
            return self.zero_points[:, : self.n_blocks]
        pairs = np.stack([self.zero_points & 0x0F, self.zero_points >> 4], axis=-1)
        return pairs.reshape(self.n, -1)[:, : self.n_blocks]

    def codes(self, rows: slice | None = None) -> np.ndarray:
        """Unpacked codes ``[N, n_blocks, block_size]`` (``16 * high + low`` for split4)."""
        pick = slice(None) if rows is None else rows
        unpacked = [unpack_codes(plane[pick], self.bits) for plane in self.planes]
        if len(unpacked) == 1:
            return np.asarray(unpacked[0])
        joined: np.ndarray = (unpacked[0].astype(np.uint16) * 16 + unpacked[1]).astype(np.uint8)
        return joined

    def dequantize(self, rows: slice | None = None) -> np.ndarray:
        """float32 ``[N, K]`` weights as the mapped model computes them (for split4, the sum of
        the two planes' exact products)."""
        pick = slice(None) if rows is None else rows
        scales = self.scales.values(rows)[..., None]
        if self.form == "split4":
            high, low = (unpack_codes(p[pick], 4).astype(np.float32) for p in self.planes)
            values = (high - 8) * scales * np.float32(16) + (low - 8) * scales
        else:
            zp = self.zero_point_values()[pick].astype(np.float32)[..., None]
            values = (self.codes(rows).astype(np.float32) - zp) * scales
        correction = self.correction(rows)
        if correction is not None:
            values = values + correction[..., None]
        return np.asarray(values.reshape(values.shape[0], -1)[:, : self.k], dtype=np.float32)

    def rounding_bound(self) -> float:
        """Largest difference :meth:`dequantize` may show from the file's float32 values:
        ``2**-24 * (max|c| + 2 max|w|)`` when ``c`` rounds, else 0."""
        if not self.rounds:
            return 0.0
        correction = self.correction()
        assert correction is not None
        largest_c = float(np.abs(correction).max(initial=0.0))
        largest_s = float(np.abs(self.scales.values()).max(initial=0.0))
        largest_w = largest_s * (1 << (self.bits - 1)) + largest_c
        return 2.0**-24 * (largest_c + 2 * largest_w)


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


def form_for(blocks: GGUFBlocks, wide: WideForm) -> Form:
    """``int4`` for codes of at most 4 bits, else the configured form for wide codes."""
    return "int4" if blocks.bits <= 4 else wide


def pack_blocks(blocks: GGUFBlocks, form: Form) -> WeightPack:
    """The file's codes and scales in ``form`` (see the module docstring): no value changes,
    only the code shift ``t`` and the correction ``c = o + e s``."""
    if form == "int4" and blocks.bits > 4:
        raise ValueError(f"{blocks.ggml_type} codes are {blocks.bits} bits: not an int4 form")
    mid, container = _MID[form], _CONTAINER_BITS[form]
    t = min(max(mid - blocks.zero, 0), (1 << container) - (1 << blocks.bits))
    shift = mid - t - blocks.zero
    codes = blocks.codes if t == 0 else (blocks.codes + np.uint8(t))
    n, k = blocks.rows, blocks.n_blocks * blocks.block_size
    planes: tuple[np.ndarray, ...]
    if form == "int4":
        planes, bits = (pack_nibbles(codes),), 4
    elif form == "split4":
        planes, bits = (pack_nibbles(codes >> np.uint8(4)), pack_nibbles(codes & np.uint8(15))), 4
    else:
        planes, bits = (np.ascontiguousarray(codes),), 8
    return WeightPack(
        source_type=blocks.ggml_type,
        form=form,
        exact=True,
        bits=bits,
        block_size=blocks.block_size,
        n=n,
        k=k,
        planes=planes,
        scales=blocks.scales,
        offsets=blocks.offsets,
        shift=shift,
    )


def pack_rtn(
    weight: np.ndarray, bits: int, block_size: int, source_type: str, form: Form | None = None
) -> WeightPack:
    """Round-to-nearest, asymmetric, per block of ``block_size`` along K, uint8 zero points;
    8-bit packs run as ``int8`` or, with ``form="dense"``, are expanded at load."""
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
        chosen: Form = "dense" if form == "dense" else "int8"
    else:
        codes = pack_nibbles(q)
        zp_even = np.zeros((n, n_blocks + (n_blocks & 1)), dtype=np.uint8)
        zp_even[:, :n_blocks] = zp
        zero_points = pack_nibbles(zp_even)
        chosen = "int4"
    return WeightPack(
        source_type=source_type,
        form=chosen,
        exact=False,
        bits=bits,
        block_size=block_size,
        n=n,
        k=k,
        planes=(codes,),
        scales=BlockValues(scales),
        zero_points=zero_points,
    )
