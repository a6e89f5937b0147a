"""Where tensors start inside an artifact: the forced cut points of content-defined chunking.

When one tensor of a model changes, chunks cut at tensor starts keep every other tensor's chunks
identical, so a gateway holding the previous variant fetches about the changed bytes only. In a
plain (uncompressed) tar: every member's data start, every tensor of a ``*.safetensors`` member
(from its JSON header), and every external-data tensor an ONNX model references (from the
protobuf walker). Anything else (single files, gzip tars) relies on content-defined cuts alone.
"""

from __future__ import annotations

import json
import struct
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from slmops_registry.formats import ArtifactInfo
from slmops_registry.protowire import OnnxWalker

_MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024


def tensor_boundaries(path: Path, info: ArtifactInfo) -> list[int]:
    """Byte offsets in the blob at ``path`` where a file or tensor begins (sorted, unique)."""
    if info.container != "tar" or info.compression != "none":
        return []
    offsets = {entry.offset_bytes for entry in info.files}
    starts = {entry.name: entry.offset_bytes for entry in info.files}
    with path.open("rb") as blob, tarfile.open(path, "r:") as tar:
        for entry in info.files:
            if entry.name.endswith(".safetensors"):
                offsets.update(_safetensors_starts(blob, entry.offset_bytes, entry.size_bytes))
        if info.onnx_model_file is not None:
            offsets.update(_external_data_starts(tar, info.onnx_model_file, starts))
    return sorted(offsets)


def _safetensors_starts(blob: BinaryIO, offset: int, size: int) -> list[int]:
    """Absolute starts of the tensors of a safetensors file beginning at ``offset``."""
    blob.seek(offset)
    raw_length = blob.read(8)
    if len(raw_length) < 8:
        return []
    (header_length,) = struct.unpack("<Q", raw_length)
    if header_length > min(size - 8, _MAX_SAFETENSORS_HEADER_BYTES):
        return []  # not a safetensors header we can trust: content-defined cuts only
    try:
        header = json.loads(blob.read(header_length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    data_start = offset + 8 + header_length
    starts = [data_start]
    for name, tensor in header.items():
        if name == "__metadata__" or not isinstance(tensor, dict):
            continue
        span = tensor.get("data_offsets")
        if isinstance(span, list) and len(span) == 2 and isinstance(span[0], int):
            starts.append(data_start + span[0])
    return [s for s in starts if offset <= s < offset + size]


def _external_data_starts(
    tar: tarfile.TarFile, model_file: str, starts: dict[str, int]
) -> list[int]:
    """Absolute starts of the external-data tensors the ONNX model references."""
    member = tar.getmember(model_file)
    handle = tar.extractfile(member)
    if handle is None:
        return []
    with handle:
        refs = OnnxWalker(handle, member.size, model_file).run()
    folder = PurePosixPath(model_file).parent
    found = []
    for ref in refs:
        data_file = str(folder / ref.location) if str(folder) != "." else ref.location
        if data_file in starts:
            found.append(starts[data_file] + ref.offset)
    return found
