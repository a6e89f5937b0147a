"""Read a GGUF file: its architecture, metadata and tensors with their raw quantized blocks.

A GGUF tensor is stored row by row (the numpy shape is the reverse of ggml's ``ne``; a linear
weight is ``[out, in]``) and each row is a run of fixed-size blocks along the input dimension.
The three block types that map exactly onto ONNX Runtime's block-quantized operators are split
here into numpy arrays, 32 elements per block:

======  ======================  ===================================
type    block bytes             value of element ``i`` of a block
======  ======================  ===================================
Q4_0    d:f16, qs[16]           ``d * (q_i - 8)``      q in 0..15
Q4_1    d:f16, m:f16, qs[16]    ``d * q_i + m``        q in 0..15
Q8_0    d:f16, qs[32]:int8      ``d * q_i``            q in -128..127
======  ======================  ===================================

In the 4-bit types byte ``j`` of ``qs`` holds element ``j`` in its low nibble and element
``j + 16`` in its high nibble (ONNX Runtime packs elements ``2j`` and ``2j + 1`` instead; the
pass repacks). Every other type (K-quants, Q5_x, IQ*, F16...) is only dequantized, with the
``gguf`` package, for the caller to requantize.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from slmops_optimizer.passes.base import PassError

#: Architectures whose GGUF files the loader and the block mapping handle (transformers' GGUF
#: loader must know them too). Only ``llama`` is exercised by the tests and the probe.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")

#: GGUF block types that map exactly (same codes, same scales) onto MatMulNBits and
#: GatherBlockQuantized.
EXACT_TYPES: frozenset[str] = frozenset({"Q4_0", "Q4_1", "Q8_0"})

#: Elements per block of the exact types.
BLOCK_ELEMENTS = 32


@dataclass(frozen=True)
class GGUFBlocks:
    """The blocks of a Q4_0, Q4_1 or Q8_0 tensor, one row of blocks per tensor row.

    ``codes`` is ``[rows, n_blocks, 32]``: uint8 0..15 for Q4_0/Q4_1, int8 for Q8_0, in element
    order. ``scales`` (``d``) and ``mins`` (``m``, Q4_1 only) are float32 ``[rows, n_blocks]``,
    exactly the float16 values of the file.
    """

    ggml_type: str
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.codes.shape[1])

    def dequantize(self) -> np.ndarray:
        """float32 ``[rows, n_blocks * 32]``, computed as the ``gguf`` package does."""
        q = self.codes.astype(np.float32)
        d = self.scales[..., None]
        if self.ggml_type == "Q4_0":
            values = d * (q - np.float32(8))
        elif self.ggml_type == "Q4_1":
            assert self.mins is not None
            values = d * q + self.mins[..., None]
        else:
            values = q * d
        return np.asarray(values.reshape(self.rows, -1), dtype=np.float32)

    def permute_rows(self, order: np.ndarray) -> GGUFBlocks:
        """The same blocks with row ``i`` taken from row ``order[i]``."""
        return GGUFBlocks(
            self.ggml_type,
            self.codes[order],
            self.scales[order],
            None if self.mins is None else self.mins[order],
        )


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: numpy-order shape and its raw bytes (a view of the file)."""

    name: str
    ggml_type: str  # GGMLQuantizationType name: "Q4_1", "Q6_K", "F32"...
    shape: tuple[int, ...]  # numpy order: [out, in] for a linear weight, [vocab, hidden] for E
    raw: np.ndarray = field(repr=False)  # as GGUFReader gives it (uint8 rows for block types)

    @property
    def exact(self) -> bool:
        """Whether the blocks map exactly onto ONNX Runtime's block-quantized operators."""
        return self.ggml_type in EXACT_TYPES and len(self.shape) == 2

    def dequantize(self) -> np.ndarray:
        """float32 values in ``shape``, exactly as transformers' GGUF loader computes them."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        values = dequantize(self.raw, GGMLQuantizationType[self.ggml_type])
        return np.asarray(values, dtype=np.float32).reshape(self.shape)

    def blocks(self) -> GGUFBlocks:
        """The blocks split into codes/scales/mins; only for the :data:`EXACT_TYPES`."""
        if not self.exact:
            raise ValueError(f"{self.name}: {self.ggml_type} blocks do not map exactly")
        return split_blocks(self.raw, self.ggml_type, rows=self.shape[0])


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    architecture: str
    metadata: dict[str, Any]  # scalar and short fields; long arrays (the vocabulary) are skipped
    tensors: dict[str, GGUFTensor]

    def meta_int(self, key: str) -> int | None:
        """An integer field of the architecture (``block_count``) or a full key."""
        value = self.metadata.get(key, self.metadata.get(f"{self.architecture}.{key}"))
        return int(value) if isinstance(value, int | float | np.integer) else None


_TYPE_SIZES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def split_blocks(raw: np.ndarray, ggml_type: str, *, rows: int | None = None) -> GGUFBlocks:
    """Split raw Q4_0 / Q4_1 / Q8_0 bytes (``[rows, bytes_per_row]`` or flat) into arrays."""
    if ggml_type not in _TYPE_SIZES:
        raise ValueError(f"{ggml_type} is not one of {sorted(_TYPE_SIZES)}")
    type_size = _TYPE_SIZES[ggml_type]
    data = np.ascontiguousarray(raw).view(np.uint8)
    n_rows = rows if rows is not None else (data.shape[0] if data.ndim > 1 else 1)
    blocks = data.reshape(n_rows, -1, type_size)

    def f16(offset: int) -> np.ndarray:
        pair = np.ascontiguousarray(blocks[..., offset : offset + 2])
        return pair.view(np.float16)[..., 0].astype(np.float32)

    scales = f16(0)
    if ggml_type == "Q8_0":
        codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
        return GGUFBlocks(ggml_type, codes, scales)
    start = 2 if ggml_type == "Q4_0" else 4
    qs = blocks[..., start : start + BLOCK_ELEMENTS // 2]
    codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)
    mins = f16(2) if ggml_type == "Q4_1" else None
    return GGUFBlocks(ggml_type, codes, scales, mins)


# GGUF value types: fixed sizes of the scalar ones; 8 = string, 9 = array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def read_architecture(path: Path) -> str:
    """``general.architecture`` from the header alone, in milliseconds (``GGUFReader`` parses the
    whole vocabulary first, seconds for a 49k-token model). Raises :class:`PassError` when the
    file is not GGUF or has no architecture."""
    path = Path(path)
    if not path.is_file():
        raise PassError(f"GGUF file not found: {path}")
    try:
        with path.open("rb") as stream:
            if stream.read(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            version, _tensors, kv_count = struct.unpack("<IQQ", stream.read(20))
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version}")
            for _ in range(kv_count):
                key = _read_string(stream)
                (value_type,) = struct.unpack("<I", stream.read(4))
                if key == "general.architecture" and value_type == _STRING:
                    return _read_string(stream)
                _skip_value(stream, value_type)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise PassError(f"{path.name} is not a readable GGUF file: {exc}") from exc
    raise PassError(f"{path.name} has no general.architecture field")


def _read_string(stream: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", stream.read(8))
    if length > 1 << 24:
        raise ValueError("implausible string length")
    return stream.read(length).decode("utf-8")


def _skip_value(stream: BinaryIO, value_type: int) -> None:
    if value_type in _SCALAR_SIZES:
        stream.seek(_SCALAR_SIZES[value_type], 1)
    elif value_type == _STRING:
        (length,) = struct.unpack("<Q", stream.read(8))
        stream.seek(length, 1)
    elif value_type == _ARRAY:
        item_type, count = struct.unpack("<IQ", stream.read(12))
        if item_type in _SCALAR_SIZES:
            stream.seek(_SCALAR_SIZES[item_type] * count, 1)
        else:
            for _ in range(count):
                _skip_value(stream, item_type)
    else:
        raise ValueError(f"unknown GGUF value type {value_type}")


def require_supported(architecture: str) -> None:
    """:class:`PassError` unless ``architecture`` is in :data:`SUPPORTED_ARCHITECTURES`."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise PassError(
            f"GGUF architecture {architecture or '(none)'!r} is not supported: supported are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def read_gguf(path: Path, *, check_architecture: bool = True) -> GGUFFile:
    """Open a GGUF file (memory-mapped: tensor bytes are read when used).

    Raises :class:`PassError` when the file is missing or not GGUF, and, with
    ``check_architecture``, when its architecture is not in :data:`SUPPORTED_ARCHITECTURES`.
    """
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

    path = Path(path)
    if not path.is_file():
        raise PassError(f"GGUF file not found: {path}")
    if check_architecture:
        require_supported(read_architecture(path))
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the gguf package raises ValueError, struct errors...
        raise PassError(f"{path.name} is not a readable GGUF file: {exc}") from exc

    metadata: dict[str, Any] = {}
    for key, value_field in reader.fields.items():
        types = value_field.types
        if types and types[0] == GGUFValueType.ARRAY and len(value_field.data) > 64:
            continue  # the vocabulary, merges...: the tokenizer reads them itself
        try:
            metadata[key] = value_field.contents()
        except Exception:  # noqa: S112 - an exotic field is not needed here
            continue

    architecture = str(metadata.get("general.architecture", ""))

    tensors: dict[str, GGUFTensor] = {}
    for tensor in reader.tensors:
        qtype = GGMLQuantizationType(int(tensor.tensor_type))
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        tensors[tensor.name] = GGUFTensor(tensor.name, qtype.name, shape, tensor.data)
    return GGUFFile(path, architecture, metadata, tensors)
