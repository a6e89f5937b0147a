"""Read a GGUF file: its architecture, metadata and tensors with their raw quantized blocks.

A GGUF tensor is stored row by row (the numpy shape is the reverse of ggml's ``ne``; a linear
weight is ``[out, in]``) and each row is a run of fixed-size blocks along the input dimension.
The block types whose values are ``scale * (code - zero) + offset`` per (sub-)block - Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q6_K - map exactly onto ONNX Runtime's
block-quantized operators; :mod:`slmops_optimizer.gguf.blocks` splits their bytes into codes,
scales and offsets. Every other type (IQ*, F16...) is only dequantized, with the ``gguf``
package, for the caller to requantize.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from slmops_optimizer.gguf.blocks import TYPE_SIZES, GGUFBlocks, split_blocks
from slmops_optimizer.passes.base import PassError

__all__ = [
    "EXACT_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "GGUFBlocks",
    "GGUFFile",
    "GGUFTensor",
    "read_architecture",
    "read_gguf",
    "require_supported",
    "split_blocks",
]

#: Architectures whose GGUF files the loader and the block mapping handle (transformers' GGUF
#: loader must know them too); services/optimizer/tests/archs runs each through the real path.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "llama",  # llama.cpp writes Mistral models as llama too
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
)

#: GGUF block types that map exactly (same codes, same scales) onto MatMulNBits and
#: GatherBlockQuantized.
EXACT_TYPES: frozenset[str] = frozenset(TYPE_SIZES)


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

    def dequantize(self, rows: slice | None = None) -> np.ndarray:
        """float32 values in ``shape`` (or the rows ``rows`` of a 2-D tensor), exactly as
        transformers' GGUF loader computes them."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        raw = self.raw if rows is None else self.raw[rows]
        values = np.asarray(dequantize(raw, GGMLQuantizationType[self.ggml_type]), np.float32)
        return values.reshape(self.shape if rows is None else (-1, *self.shape[1:]))

    def blocks(self) -> GGUFBlocks:
        """The blocks split into codes, scales and offsets; only for the :data:`EXACT_TYPES`."""
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
