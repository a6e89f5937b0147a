"""Streaming inspection of a model artifact on local disk, before the registry accepts it.

A published model version is one blob in one of the ``ModelFormat`` formats:

* ``onnx``: a single ONNX protobuf file, or a tar holding exactly one ``*.onnx`` plus the
  external-data files its tensors reference;
* ``hf-safetensors``: a tar of a Hugging Face model folder (``config.json`` + ``*.safetensors``);
* ``gguf``: a single GGUF file.

Everything here reads headers and seeks past payloads: a multi-GB artifact is never loaded into
memory and nothing is extracted from a tar. Failures raise ``ArtifactFormatError``, whose message
the API returns to the uploader (HTTP 422), so each one names the offending member or field.

This module sniffs the content, checks GGUF headers and composes the two lower layers:
``tarsafety`` (member iteration and the checks against unsafe tars, and ``ArtifactFormatError``)
and ``protowire`` (the streaming ONNX protobuf walker and external-data discovery). It is the
public entry point: import the names in ``__all__`` from here, not from those modules.
"""

from __future__ import annotations

import re
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from slmops.events.payloads import ModelFormat
from slmops_registry.protowire import GraphOutput, OnnxWalker, check_onnx_tar
from slmops_registry.tarsafety import ArtifactFormatError, safe_member_name, scan_members

__all__ = [
    "KNOWN_FORMATS",
    "ArtifactFormatError",
    "ArtifactInfo",
    "FileEntry",
    "GraphOutput",
    "inspect_artifact",
    "safe_member_name",
]

KNOWN_FORMATS: tuple[str, ...] = get_args(ModelFormat)

_GGUF_MAGIC = b"GGUF"


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
    #: ONNX: the main graph's declared outputs (what an encoder's embedding choice reads).
    onnx_outputs: list[GraphOutput] = Field(default_factory=list)
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
            members = scan_members(tf, max_members)
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
                model, external, outputs = check_onnx_tar(tf, members)
                return info.model_copy(
                    update={
                        "onnx_model_file": model,
                        "external_data_files": external,
                        "onnx_outputs": outputs,
                    }
                )
            _check_hf_tar(members)
            return info
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        what = "gzip-compressed tar" if gzip else "tar archive"
        raise ArtifactFormatError(f"{what} is corrupt, truncated or not a tar: {exc}") from exc


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


# --- onnx ---------------------------------------------------------------------------------


def _inspect_onnx_file(path: Path, size: int) -> ArtifactInfo:
    with path.open("rb") as fp:
        walker = OnnxWalker(fp, size, path.name)
        refs = walker.run()
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
        onnx_outputs=walker.outputs,
    )
