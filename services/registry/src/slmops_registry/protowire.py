"""A streaming walker over the protobuf wire format of an ONNX model, and external-data discovery.

ONNX models are protobuf ``ModelProto`` messages, but neither ``onnx`` nor ``protobuf`` is a
registry dependency, and parsing a multi-GB model with them would load it into memory. This
walker instead reads tags and lengths only, seeks past every payload it does not need (raw tensor
data included) and descends just along the paths where tensors live, to collect the tensors whose
data is stored outside the model file. ``check_onnx_tar`` then resolves those references against
the members of an ONNX tar, so a model is never accepted without the data files it needs. The
walker also reads the main graph's declared outputs (name, element type, shape): enough for the
registry to tell an encoder's embedding output (``slmops.embeddings``) without loading weights.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from typing import IO, NamedTuple

from slmops_registry.tarsafety import ArtifactFormatError, safe_member_name

_MAX_PROTO_DEPTH = 100  # nested ONNX messages (graph > node > attribute > subgraph ...)
_MAX_PROTO_STRING = 4096  # external_data keys/values; real ones are short paths and integers


def check_onnx_tar(
    tf: tarfile.TarFile, files: dict[str, tarfile.TarInfo]
) -> tuple[str, list[str], list[GraphOutput]]:
    """Return the model member, the external-data members its tensors reference and the
    outputs its graph declares."""
    models = [name for name in files if name.lower().endswith(".onnx")]
    if len(models) != 1:
        found = f"found {len(models)}: {', '.join(models[:10])}" if models else "found none"
        raise ArtifactFormatError(f"onnx tar must hold exactly one *.onnx file; {found}")
    model = models[0]
    fp = tf.extractfile(files[model])
    assert fp is not None  # a regular member always has a file object
    walker = OnnxWalker(fp, files[model].size, model)
    refs = walker.run()
    base = posixpath.dirname(model)
    external: list[str] = []
    for ref in refs:
        what = f"external data location of tensor {ref.tensor!r}"
        name = posixpath.join(base, safe_member_name(ref.location, what=what))
        member = files.get(name)
        if member is None:
            raise ArtifactFormatError(
                f"{model}: tensor {ref.tensor!r} references external data file {ref.location!r},"
                f" but the tar has no file {name!r}"
            )
        end = ref.offset + (ref.length if ref.length is not None else 0)
        if ref.offset > member.size or end > member.size:
            raise ArtifactFormatError(
                f"{model}: tensor {ref.tensor!r} reads bytes {ref.offset}..{end} of {name!r},"
                f" which has only {member.size} bytes"
            )
        if name not in external:
            external.append(name)
    return model, external, walker.outputs


class _Field(NamedTuple):
    number: int
    wire_type: int
    value: int  # the varint's value; the payload length for length-delimited fields
    start: int  # payload start (length-delimited / fixed-width fields)
    end: int


class ExternalRef(NamedTuple):
    tensor: str
    location: str
    offset: int
    length: int | None


class GraphOutput(NamedTuple):
    """A declared output of the main graph: ``elem_type`` is the TensorProto.DataType code
    (None: not a tensor), ``shape`` None when the rank is unknown; a dim is a value, a
    symbolic name or None."""

    name: str
    elem_type: int | None
    shape: tuple[int | str | None, ...] | None


# Message -> {field number: child message}, only along the paths where tensors live (the same
# places the onnx package looks for external data: initializers and node attributes, including
# those of subgraphs). Field numbers are from onnx.proto.
_CHILDREN: dict[str, dict[int, str]] = {
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


class OnnxWalker:
    """Walks an ONNX ModelProto in the protobuf wire format, seeking past every payload it
    does not need (raw tensor data included), and collects external-data references."""

    def __init__(self, fp: IO[bytes], size: int, what: str) -> None:
        self.fp, self.size, self.what = fp, size, what
        self.refs: list[ExternalRef] = []
        self.outputs: list[GraphOutput] = []

    def run(self) -> list[ExternalRef]:
        graphs = 0
        for index, field in enumerate(self._fields(0, self.size)):
            if index == 0 and (field.number, field.wire_type) != (1, 0):
                raise self._error("it does not start with ir_version (field 1, tag 0x08)")
            if field.number == 7:
                self._expect_bytes(field, "ModelProto.graph")
                self._walk("graph", field.start, field.end, depth=1)
                self.outputs += self._graph_outputs(field.start, field.end)
                graphs += 1
        if not graphs:
            raise self._error("it has no graph (ModelProto field 7)")
        return self.refs

    def _error(self, detail: str) -> ArtifactFormatError:
        return ArtifactFormatError(f"{self.what} is not a valid ONNX model: {detail}")

    def _walk(self, message: str, start: int, end: int, depth: int) -> None:
        if depth > _MAX_PROTO_DEPTH:
            raise self._error(f"messages nested deeper than {_MAX_PROTO_DEPTH} levels")
        if message == "tensor":
            self._tensor(start, end)
            return
        children = _CHILDREN[message]
        for field in self._fields(start, end):
            child = children.get(field.number)
            if child is not None:
                self._expect_bytes(field, f"{message} field {field.number}")
                self._walk(child, field.start, field.end, depth + 1)

    def _tensor(self, start: int, end: int) -> None:
        name, external = "", False
        entries: dict[str, str] = {}
        for field in self._fields(start, end):
            if field.number == 8 and field.wire_type == 2:  # name; only needed for messages
                name = self._read(field, cap=200).decode("utf-8", "replace")
            elif field.number == 13:  # external_data: StringStringEntryProto
                self._expect_bytes(field, "TensorProto.external_data")
                key, value = "", ""
                for sub in self._fields(field.start, field.end):
                    if sub.number in (1, 2) and sub.wire_type == 2:
                        if sub.value > _MAX_PROTO_STRING:
                            raise self._error(
                                f"tensor {name!r} has an over-long external_data entry"
                            )
                        text = self._read(sub, cap=sub.value).decode("utf-8", "replace")
                        key, value = (text, value) if sub.number == 1 else (key, text)
                entries[key] = value
            elif field.number == 14 and field.wire_type == 0:  # data_location
                external = field.value == 1  # EXTERNAL; entries without it are ignored by onnx
        if not external:
            return
        if not entries.get("location"):
            raise self._error(f"tensor {name!r} has external data without a 'location'")
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else None
            if offset < 0 or (length is not None and length < 0):
                raise ValueError("negative")
        except ValueError as exc:
            raise self._error(
                f"tensor {name!r} has an external offset/length that is not an integer >= 0"
            ) from exc
        self.refs.append(ExternalRef(name, entries["location"], offset, length))

    def _graph_outputs(self, start: int, end: int) -> list[GraphOutput]:
        """GraphProto.output (12): ValueInfoProto {1: name, 2: TypeProto {1: tensor_type
        {1: elem_type, 2: TensorShapeProto {1: dim {1: dim_value, 2: dim_param}}}}}."""
        outputs = []
        for field in self._fields(start, end):
            if field.number != 12:
                continue
            self._expect_bytes(field, "GraphProto.output")
            name, elem, shape = "", None, None
            for value in self._fields(field.start, field.end):
                if value.number == 1 and value.wire_type == 2:
                    name = self._string(value, "an output name")
                elif value.number == 2 and value.wire_type == 2:
                    for kind in self._fields(value.start, value.end):
                        if kind.number == 1 and kind.wire_type == 2:  # tensor_type
                            elem, shape = self._tensor_type(kind.start, kind.end)
            outputs.append(GraphOutput(name, elem, shape))
        return outputs

    def _tensor_type(self, start: int, end: int) -> tuple[int, tuple[int | str | None, ...] | None]:
        elem, shape = 0, None
        for field in self._fields(start, end):
            if field.number == 1 and field.wire_type == 0:
                elem = field.value
            elif field.number == 2 and field.wire_type == 2:
                shape = tuple(
                    self._dim(d.start, d.end)
                    for d in self._fields(field.start, field.end)
                    if d.number == 1 and d.wire_type == 2
                )
        return elem, shape

    def _dim(self, start: int, end: int) -> int | str | None:
        for field in self._fields(start, end):
            if field.number == 1 and field.wire_type == 0:  # int64: two's complement
                return field.value - (1 << 64) if field.value >= 1 << 63 else field.value
            if field.number == 2 and field.wire_type == 2:
                return self._string(field, "a dimension name")
        return None

    def _string(self, field: _Field, what: str) -> str:
        if field.value > _MAX_PROTO_STRING:
            raise self._error(f"{what} is longer than {_MAX_PROTO_STRING} bytes")
        return self._read(field, cap=field.value).decode("utf-8", "replace")

    def _expect_bytes(self, field: _Field, label: str) -> None:
        if field.wire_type != 2:
            raise self._error(f"{label} has wire type {field.wire_type}, expected 2 (bytes)")

    def _read(self, field: _Field, cap: int) -> bytes:
        """The first ``cap`` bytes of a length-delimited field's payload."""
        self.fp.seek(field.start)
        return self.fp.read(min(field.value, cap))

    def _fields(self, start: int, end: int) -> Iterator[_Field]:
        """The fields of the message in [start, end); payloads are skipped by position only."""
        pos = start
        while pos < end:
            tag, pos = self._varint(pos, end)
            number, wire_type = tag >> 3, tag & 7
            if number == 0:
                raise self._error(f"invalid field number 0 at byte {pos}")
            if wire_type == 0:
                value, pos = self._varint(pos, end)
                yield _Field(number, wire_type, value, pos, pos)
                continue
            if wire_type == 2:
                length, pos = self._varint(pos, end)
            elif wire_type in (1, 5):
                length = 8 if wire_type == 1 else 4
            else:  # 3/4 are deprecated groups, 6/7 do not exist; ONNX uses neither
                raise self._error(f"field {number} at byte {pos} has wire type {wire_type}")
            if length > end - pos:
                raise self._error(
                    f"field {number} at byte {pos} declares {length} bytes but only {end - pos} "
                    "remain (truncated file?)"
                )
            yield _Field(number, wire_type, length, pos, pos + length)
            pos += length

    def _varint(self, pos: int, end: int) -> tuple[int, int]:
        self.fp.seek(pos)
        raw = self.fp.read(min(10, end - pos))
        result = 0
        for i, byte in enumerate(raw):
            result |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                return result, pos + i + 1
        if len(raw) == 10:
            raise self._error(f"varint longer than 10 bytes at byte {pos}")
        raise self._error(f"varint at byte {pos} runs past the end (truncated file?)")
