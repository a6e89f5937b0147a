"""Read an ONNX file's ``metadata_props`` without parsing its graph or weights.

A variant is one ONNX file that describes itself in its metadata (task, tokenizer, generation
settings). Readers that only need that description - a gateway deciding how to serve a model,
the validator building its inputs - would otherwise parse the whole protobuf (weights included,
hundreds of MB) with ``onnx.load``. ``ModelProto`` keeps ``metadata_props`` as top-level field
14; this reader walks the top-level fields, seeks past every other payload, and decodes only
those key/value pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

_METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto
_KEY, _VALUE = 1, 2  # StringStringEntryProto fields
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class OnnxMetadataError(ValueError):
    """The file is not an ONNX protobuf this reader can walk."""


def read_metadata(path: Path) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict (later keys win, as in ONNX Runtime)."""
    path = Path(path)
    size = path.stat().st_size
    found: dict[str, str] = {}
    with path.open("rb") as stream:
        while stream.tell() < size:
            number, wire_type = _tag(stream)
            if wire_type == _VARINT:
                _varint(stream)
            elif wire_type == _FIXED64:
                stream.seek(8, 1)
            elif wire_type == _FIXED32:
                stream.seek(4, 1)
            elif wire_type == _LENGTH:
                length = _varint(stream)
                if stream.tell() + length > size:
                    raise OnnxMetadataError(f"{path.name}: a field runs past the end of the file")
                if number == _METADATA_PROPS:
                    key, value = _entry(stream.read(length))
                    found[key] = value
                else:
                    stream.seek(length, 1)
            else:
                raise OnnxMetadataError(f"{path.name}: wire type {wire_type} is not protobuf")
    return found


def _entry(payload: bytes) -> tuple[str, str]:
    fields: dict[int, str] = {}
    position = 0
    while position < len(payload):
        tag, position = _varint_at(payload, position)
        length, position = _varint_at(payload, position)
        if tag & 7 != _LENGTH:
            raise OnnxMetadataError("a metadata entry holds a field that is not a string")
        fields[tag >> 3] = payload[position : position + length].decode("utf-8")
        position += length
    return fields.get(_KEY, ""), fields.get(_VALUE, "")


def _tag(stream: BinaryIO) -> tuple[int, int]:
    tag = _varint(stream)
    return tag >> 3, tag & 7


def _varint(stream: BinaryIO) -> int:
    result = shift = 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise OnnxMetadataError("the file ends inside a varint")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise OnnxMetadataError("a varint longer than 10 bytes")


def _varint_at(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while position < len(data):
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
    raise OnnxMetadataError("a metadata entry ends inside a varint")
