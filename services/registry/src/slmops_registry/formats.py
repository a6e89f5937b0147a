"""Streaming inspection of a model artifact on local disk, before the registry accepts it.

A published model version is one blob in one of the ``ModelFormat`` formats:

* ``onnx``: a single ONNX protobuf file, or a tar holding exactly one ``*.onnx`` plus the
  external-data files its tensors reference;
* ``hf-safetensors``: a tar of a Hugging Face model folder (``config.json`` + ``*.safetensors``);
* ``gguf``: a single GGUF file.

Everything here reads headers and seeks past payloads: a multi-GB artifact is never loaded into
memory and nothing is extracted from a tar. Failures raise ``ArtifactFormatError``, whose message
the API returns to the uploader (HTTP 422), so each one names the offending member or field.
"""

from __future__ import annotations

import posixpath
import re
import struct
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict, Field

from slmops.events.payloads import ModelFormat

KNOWN_FORMATS: tuple[str, ...] = get_args(ModelFormat)

_CHUNK = 64 * 1024
_GGUF_MAGIC = b"GGUF"
_MAX_PROTO_DEPTH = 100  # nested ONNX messages (graph > node > attribute > subgraph ...)
_MAX_PROTO_STRING = 4096  # external_data keys/values; real ones are short paths and integers


class ArtifactFormatError(ValueError):
    """The artifact does not match its declared format; the message says why (HTTP 422)."""


class FileEntry(BaseModel):
    """One file of the artifact: a tar member, or the whole blob for ``container="file"``."""

    model_config = ConfigDict(frozen=True)

    name: str
    size_bytes: int
    #: Where the file's data starts: ``TarInfo.offset_data`` for a tar member, 0 for a plain file.
    #: For a gzip tar it is an offset into the *decompressed* tar stream.
    offset_bytes: int


class ArtifactInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    format: ModelFormat
    container: Literal["file", "tar"]
    #: "gzip" only for a gzip-compressed tar; then ``FileEntry.offset_bytes`` are not blob offsets.
    compression: Literal["none", "gzip"] = "none"
    files: list[FileEntry]
    onnx_model_file: str | None = None
    external_data_files: list[str] = Field(default_factory=list)
    gguf_version: int | None = None
    gguf_tensor_count: int | None = None
    gguf_kv_count: int | None = None


def inspect_artifact(
    path: Path, declared_format: str, *, max_members: int = 10_000
) -> ArtifactInfo:
    """Describe the artifact at ``path`` after checking it is a well-formed ``declared_format``.

    Raises ``ArtifactFormatError`` with a human-readable reason otherwise.
    """
    if declared_format not in KNOWN_FORMATS:
        known = ", ".join(KNOWN_FORMATS)
        raise ArtifactFormatError(f"unknown format {declared_format!r}; known formats: {known}")
    size = path.stat().st_size
    kind = _sniff(path, size)
    if kind == "empty":
        raise ArtifactFormatError("artifact is empty (0 bytes)")
    if kind == "compressed":
        raise ArtifactFormatError(
            "artifact is bzip2/xz/zstd-compressed; only plain or gzip-compressed tars are accepted"
        )
    if declared_format == "gguf":
        if kind != "gguf":
            raise _mismatch("gguf", kind, "a gguf artifact is a single GGUF file")
        return _inspect_gguf(path, size)
    if kind in ("tar", "gzip"):
        return _inspect_tar(path, declared_format, gzip=kind == "gzip", max_members=max_members)
    if declared_format == "onnx":
        if kind != "onnx":
            raise _mismatch("onnx", kind, "an onnx artifact is an ONNX model file or a tar of one")
        return _inspect_onnx_file(path, size)
    raise _mismatch(declared_format, kind, "an hf-safetensors artifact is a tar of a model folder")


def safe_member_name(name: str, *, what: str = "tar member") -> str:
    """Normalise a relative archive path (``./a//b`` -> ``a/b``) or reject one that could escape.

    Returns ``""`` for the archive root itself (``.`` or ``./``, which ``tar -C dir .`` writes).
    """
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise ArtifactFormatError(f"{what} {name!r} has an absolute path")
    if "\\" in name:
        # A backslash is a separator on Windows consumers: "..\\x" would escape there.
        raise ArtifactFormatError(f"{what} {name!r} contains a backslash")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArtifactFormatError(f"{what} {name!r} has a '..' component (escapes the root)")
    return "/".join(parts)


# --- sniffing -----------------------------------------------------------------------------

_KIND_TEXT = {
    "gguf": "a GGUF file",
    "gzip": "a gzip stream",
    "tar": "a tar archive",
    "onnx": "an ONNX model",
    "unknown": "neither a tar, a GGUF file nor an ONNX model",
}


def _sniff(path: Path, size: int) -> str:
    with path.open("rb") as fp:
        head = fp.read(2 * tarfile.BLOCKSIZE)
    if not head:
        return "empty"
    if head.startswith(_GGUF_MAGIC):
        return "gguf"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith((b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")):
        return "compressed"
    if head[257:262] == b"ustar":
        return "tar"
    if size % tarfile.BLOCKSIZE == 0 and not head.strip(b"\0"):
        return "tar"  # only an end-of-archive marker: an empty tar, rejected as such later
    if head[0] == 0x08:  # tag of ModelProto field 1 (ir_version, varint), written first
        return "onnx"
    if tarfile.is_tarfile(path):
        return "tar"  # pre-POSIX (v7) tar, which has no ustar magic
    return "unknown"


def _mismatch(declared: str, kind: str, expected: str) -> ArtifactFormatError:
    found = _KIND_TEXT.get(kind, kind)
    return ArtifactFormatError(
        f"declared format {declared!r} but the content is {found}; {expected}"
    )


# --- gguf ---------------------------------------------------------------------------------


def _inspect_gguf(path: Path, size: int) -> ArtifactInfo:
    with path.open("rb") as fp:
        head = fp.read(24)
    if len(head) < 8:
        raise ArtifactFormatError(f"GGUF header is truncated: file has only {len(head)} bytes")
    (version,) = struct.unpack_from("<I", head, 4)
    if not 1 <= version <= 3:
        swapped = int.from_bytes(head[4:8], "big")
        hint = (
            " (a big-endian GGUF file; only little-endian is supported)"
            if 1 <= swapped <= 3
            else ""
        )
        raise ArtifactFormatError(f"unsupported GGUF version {version}{hint}; supported: 1 to 3")
    counts = "<II" if version == 1 else "<QQ"  # GGUF v1 had 32-bit counts
    need = 8 + struct.calcsize(counts)
    if len(head) < need:
        raise ArtifactFormatError(f"GGUF header is truncated: {len(head)} of {need} bytes")
    # Only the header is checked: the tensor and metadata tables are the runtime's business.
    tensors, kvs = struct.unpack_from(counts, head, 8)
    return ArtifactInfo(
        format="gguf",
        container="file",
        files=[FileEntry(name=path.name, size_bytes=size, offset_bytes=0)],
        gguf_version=version,
        gguf_tensor_count=tensors,
        gguf_kv_count=kvs,
    )


# --- tar ----------------------------------------------------------------------------------


def _inspect_tar(path: Path, fmt: str, *, gzip: bool, max_members: int) -> ArtifactInfo:
    try:
        with tarfile.open(path, "r:gz" if gzip else "r:") as tf:
            members = _scan_members(tf, max_members)
            files = [
                FileEntry(name=name, size_bytes=info.size, offset_bytes=info.offset_data)
                for name, info in members.items()
            ]
            info = ArtifactInfo(
                format="onnx" if fmt == "onnx" else "hf-safetensors",
                container="tar",
                compression="gzip" if gzip else "none",
                files=files,
            )
            if fmt == "onnx":
                model, external = _check_onnx_tar(tf, members)
                return info.model_copy(
                    update={"onnx_model_file": model, "external_data_files": external}
                )
            _check_hf_tar(members)
            return info
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        what = "gzip-compressed tar" if gzip else "tar archive"
        raise ArtifactFormatError(f"{what} is corrupt, truncated or not a tar: {exc}") from exc


def _scan_members(tf: tarfile.TarFile, max_members: int) -> dict[str, tarfile.TarInfo]:
    """Regular files by normalised name, after rejecting every member we would not extract."""
    seen: set[str] = set()
    files: dict[str, tarfile.TarInfo] = {}
    for count, member in enumerate(tf, start=1):  # reads headers only, seeks past the data
        if count > max_members:
            raise ArtifactFormatError(f"tar archive has more than {max_members} members")
        name = safe_member_name(member.name)
        label = f"tar member {member.name!r}"
        if member.issym():
            raise ArtifactFormatError(f"{label} is a symbolic link (to {member.linkname!r})")
        if member.islnk():
            raise ArtifactFormatError(f"{label} is a hard link (to {member.linkname!r})")
        if member.ischr() or member.isblk():
            raise ArtifactFormatError(f"{label} is a device file")
        if member.isfifo():
            raise ArtifactFormatError(f"{label} is a FIFO (named pipe)")
        if member.issparse():
            raise ArtifactFormatError(f"{label} is a GNU sparse file, which is not supported")
        if not (member.isreg() or member.isdir()):
            raise ArtifactFormatError(f"{label} has unsupported type {member.type!r}")
        if not name and not member.isdir():
            raise ArtifactFormatError(f"{label} is a file without a name")
        if name in seen:
            raise ArtifactFormatError(f"{label} appears more than once (duplicate member name)")
        if name:
            seen.add(name)
        if member.isreg():
            files[name] = member
    _check_end_of_archive(tf)
    for name in seen:  # "a" as a file and "a/b/c": extractors would fail or clobber one of them
        parent = posixpath.dirname(name)
        while parent:
            if parent in files:
                raise ArtifactFormatError(f"tar member {parent!r} is a file but also a folder")
            parent = posixpath.dirname(parent)
    if not files:
        raise ArtifactFormatError("tar archive is empty: it holds no files")
    return files


def _check_end_of_archive(tf: tarfile.TarFile) -> None:
    """Fail when iteration stopped at something other than zero blocks.

    ``tarfile`` silently ends iteration at an invalid header after the first member, so a
    corrupt or smuggled tail would be invisible to us but maybe not to another tar reader.
    """
    fp = tf.fileobj
    assert fp is not None  # an open TarFile always has one
    fp.seek(tf.offset)
    pos = tf.offset
    while chunk := fp.read(_CHUNK):
        stripped = chunk.lstrip(b"\0")
        if stripped:
            at = pos + len(chunk) - len(stripped)
            if at == tf.offset:
                raise ArtifactFormatError(f"tar archive has an invalid member header at byte {at}")
            raise ArtifactFormatError(
                f"tar archive has data at byte {at}, after its end-of-archive marker"
            )
        pos += len(chunk)


def _check_hf_tar(files: dict[str, tarfile.TarInfo]) -> None:
    if "config.json" in files:
        root = ""
    else:
        roots = sorted(
            n[: -len("/config.json")] for n in files if re.fullmatch(r"[^/]+/config\.json", n)
        )
        if not roots:
            raise ArtifactFormatError(
                "hf-safetensors tar has no config.json at its root or in a top-level folder"
            )
        if len(roots) > 1:
            raise ArtifactFormatError(
                f"hf-safetensors tar has config.json in several top-level folders: {roots}"
            )
        root = roots[0] + "/"
    if not any(n.startswith(root) and n.endswith(".safetensors") for n in files):
        where = f"under {root!r}" if root else "in the tar"
        raise ArtifactFormatError(f"hf-safetensors tar has no *.safetensors file {where}")


def _check_onnx_tar(
    tf: tarfile.TarFile, files: dict[str, tarfile.TarInfo]
) -> tuple[str, list[str]]:
    """Return the model member and the external-data members its tensors reference."""
    models = [name for name in files if name.lower().endswith(".onnx")]
    if len(models) != 1:
        found = f"found {len(models)}: {', '.join(models[:10])}" if models else "found none"
        raise ArtifactFormatError(f"onnx tar must hold exactly one *.onnx file; {found}")
    model = models[0]
    fp = tf.extractfile(files[model])
    assert fp is not None  # a regular member always has a file object
    refs = _OnnxWalker(fp, files[model].size, model).run()
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
    return model, external


# --- onnx ---------------------------------------------------------------------------------


def _inspect_onnx_file(path: Path, size: int) -> ArtifactInfo:
    with path.open("rb") as fp:
        refs = _OnnxWalker(fp, size, path.name).run()
    if refs:
        raise ArtifactFormatError(
            f"ONNX model references external data ({refs[0].location!r} for tensor "
            f"{refs[0].tensor!r}); external data needs a tar holding the .onnx and its data files"
        )
    return ArtifactInfo(
        format="onnx",
        container="file",
        files=[FileEntry(name=path.name, size_bytes=size, offset_bytes=0)],
        onnx_model_file=path.name,
    )


class _Field(NamedTuple):
    number: int
    wire_type: int
    value: int  # the varint's value; the payload length for length-delimited fields
    start: int  # payload start (length-delimited / fixed-width fields)
    end: int


class _ExternalRef(NamedTuple):
    tensor: str
    location: str
    offset: int
    length: int | None


# Message -> {field number: child message}, only along the paths where tensors live (the same
# places the onnx package looks for external data: initializers and node attributes, including
# those of subgraphs). Field numbers are from onnx.proto.
_CHILDREN: dict[str, dict[int, str]] = {
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


class _OnnxWalker:
    """Walks an ONNX ModelProto in the protobuf wire format, seeking past every payload it
    does not need (raw tensor data included), and collects external-data references."""

    def __init__(self, fp: IO[bytes], size: int, what: str) -> None:
        self.fp, self.size, self.what = fp, size, what
        self.refs: list[_ExternalRef] = []

    def run(self) -> list[_ExternalRef]:
        graphs = 0
        for index, field in enumerate(self._fields(0, self.size)):
            if index == 0 and (field.number, field.wire_type) != (1, 0):
                raise self._error("it does not start with ir_version (field 1, tag 0x08)")
            if field.number == 7:
                self._expect_bytes(field, "ModelProto.graph")
                self._walk("graph", field.start, field.end, depth=1)
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
        self.refs.append(_ExternalRef(name, entries["location"], offset, length))

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
