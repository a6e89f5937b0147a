"""The ``fastcdc-gear-v1`` cut-point rule and a fast way to evaluate it in pure Python.

The rule (this is the format: changing anything here changes every manifest):

* a 64-bit gear hash ``h = ((h << 1) + GEAR[byte]) mod 2**64``, restarted at 0 at ``min_size``
  bytes into each chunk (FastCDC's cut-point skipping); ``GEAR[i]`` is the first 8 bytes
  (big-endian) of ``sha256(b"slmops-gear-v1:%d" % i)``, so the table is the same everywhere;
* normalized chunking with two masks: before ``avg_size`` a byte ends the chunk when
  ``h & mask(bits + 2) == 0``, after it when ``h & mask(bits - 2) == 0``, ``bits = log2(avg)``
  rounded down; ``mask(n)`` has the low ``min(n, 13)`` bits set and spreads the rest evenly
  over bits 13..63, so a cut depends on the last 64 bytes.

Evaluating the hash byte by byte in Python runs at a few MB/s. Because the low 13 bits of ``h``
depend only on the last 13 bytes, :func:`_candidates` computes them for a whole piece at once in
16-bit lanes of one big integer (C-speed integer arithmetic); only the rare positions whose low
bits are all zero (about 1 in 8192) get the exact 64-bit hash. Results equal the byte loop.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Final

ALGORITHM: Final = "fastcdc-gear-v1"
GEAR: tuple[int, ...] = tuple(
    int.from_bytes(hashlib.sha256(b"slmops-gear-v1:%d" % i).digest()[:8], "big") for i in range(256)
)
_M64 = (1 << 64) - 1
_WINDOW = 64  # bytes that influence a 64-bit gear hash
_FILTER_BITS = 13  # low hash bits computed in bulk; 16-bit lanes leave room for the carries
_PIECE = 32 * 1024  # bytes per bulk evaluation: small temporaries (larger ones are slower)
_T_LO = bytes(g & 0xFF for g in GEAR)
_T_HI = bytes((g >> 8) & 0x1F for g in GEAR)


def mask(bits: int) -> int:
    """The cut mask with ``bits`` bits set (see the module docstring)."""
    low = min(bits, _FILTER_BITS)
    spread, m = bits - low, (1 << low) - 1
    for j in range(spread):
        m |= 1 << (_FILTER_BITS + (2 * j + 1) * (64 - _FILTER_BITS) // (2 * spread))
    return m


def masks(avg_size_bytes: int) -> tuple[int, int]:
    """(mask before the average size, mask after it) for normalized chunking."""
    bits = avg_size_bytes.bit_length() - 1
    return mask(bits + 2), mask(bits - 2)


def hash_at(buf: bytes | bytearray, start: int, i: int) -> int:
    """The gear hash after byte ``i`` when hashing began at ``start`` (exact, byte by byte)."""
    h, gear = 0, GEAR
    for b in buf[max(start, i - _WINDOW + 1) : i + 1]:
        h = ((h << 1) + gear[b]) & _M64
    return h


@functools.lru_cache(maxsize=8)  # full pieces repeat; a few hundred KB each
def _lane_constants(n: int, bits: int) -> tuple[int, dict[int, int]]:
    """(1 in each of ``n`` 16-bit lanes, {b: the low b bits set in each lane}) for the ``b``
    that :func:`_candidates` needs."""
    ones = ((1 << (16 * n)) - 1) // 0xFFFF
    need = {bits} | {bits - s for s in (1, 2, 4, 8) if s < bits}
    return ones, {b: ones * ((1 << b) - 1) for b in need}


def _candidates(data: bytes | bytearray, bits: int) -> int:
    """Bitset with bit ``16*i`` set where the hash of ``data`` (begun at data[0]) has its low
    ``bits`` bits zero after byte ``i``."""
    n = len(data)
    lanes = bytearray(2 * n)
    lanes[0::2], lanes[1::2] = data.translate(_T_LO), data.translate(_T_HI)
    ones, low = _lane_constants(n, bits)
    y, s = int.from_bytes(lanes, "little"), 1
    if bits < _FILTER_BITS:
        y &= low[bits]
    while s < bits:  # lane i becomes sum(G[i-k] << k for k < 2s) mod 2**bits, plus carries
        y += (y & low[bits - s]) << (17 * s)  # that stay below 2**16: 5 * 2**13 < 2**16
        s <<= 1
    return ((((y & low[bits]) + low[bits]) >> bits) & ones) ^ ones  # carry marks nonzero


def find_cut(buf: bytearray, start: int, lo: int, hi: int, cut_mask: int) -> int:
    """The first ``i`` in [lo, hi) whose hash (begun at ``start``) has ``h & cut_mask == 0``,
    else -1."""
    bits = min(_FILTER_BITS, (~cut_mask & (cut_mask + 1)).bit_length() - 1)
    p = lo
    while p < hi:
        e, c0 = min(hi, p + _PIECE), max(start, p - _WINDOW + 1)
        # A run of one byte value: every hash from c0 + 63 on is the same, so the first 64
        # positions decide for the whole piece (sparse files, zero padding).
        v, e_eval = buf[c0], e
        if buf[e - 1] == v and buf.count(v, c0, e) == e - c0:
            e_eval = min(e, c0 + _WINDOW)
        flags = _candidates(buf[c0:e_eval], bits) >> (16 * (p - c0))
        if flags.bit_count() > (e_eval - p) >> 8:  # hostile or degenerate data: go exact
            h = hash_at(buf, start, p - 1) if p > start else 0
            gear = GEAR
            for i in range(p, e_eval):
                h = ((h << 1) + gear[buf[i]]) & _M64
                if not h & cut_mask:
                    return i
            flags = 0
        while flags:
            low_bit = flags & -flags
            i = p + (low_bit.bit_length() - 1) // 16
            if not hash_at(buf, start, i) & cut_mask:
                return i
            flags ^= low_bit
        p = e
    return -1
