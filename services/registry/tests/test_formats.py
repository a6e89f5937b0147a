"""Artifact inspection on real files: hand-encoded ONNX protobufs, GGUF headers and crafted tars.

Neither ``onnx`` nor ``onnxruntime`` is installed, so ONNX models are written with the protobuf
wire format directly (field numbers from onnx.proto).
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from pydantic import ValidationError

from slmops_registry.formats import (
    KNOWN_FORMATS,
    ArtifactFormatError,
    ArtifactInfo,
    inspect_artifact,
    safe_member_name,
)

# --- a tiny protobuf / ONNX encoder --------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def vfield(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def bfield(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(data)) + data


def tensor(
    name: str = "w", *, raw: bytes | None = None, external: dict[str, str] | None = None
) -> bytes:
    """TensorProto: dims=[4], data_type=FLOAT, name, raw_data or external_data + EXTERNAL."""
    body = vfield(1, 4) + vfield(2, 1) + bfield(8, name)
    if raw is not None:
        body += bfield(9, raw)
    for key, value in (external or {}).items():
        body += bfield(13, bfield(1, key) + bfield(2, value))  # StringStringEntryProto
    if external is not None:
        body += vfield(14, 1)  # data_location = EXTERNAL
    return body


def identity_node(extra_attribute: bytes = b"") -> bytes:
    """NodeProto: Identity(w) -> y, optionally with one AttributeProto."""
    node = bfield(1, "w") + bfield(2, "y") + bfield(3, "id0") + bfield(4, "Identity")
    return node + (bfield(5, extra_attribute) if extra_attribute else b"")


def graph(initializer: bytes, node: bytes | None = None) -> bytes:
    """GraphProto: node, name, initializer, output y."""
    node = identity_node() if node is None else node
    return bfield(1, node) + bfield(2, "g") + bfield(5, initializer) + bfield(12, bfield(1, "y"))


def model(graph_body: bytes | None, *, ir_version: int = 8) -> bytes:
    """ModelProto: ir_version, producer_name, graph, opset_import {"" : 17}."""
    out = vfield(1, ir_version) + bfield(2, "slmops-test")
    if graph_body is not None:
        out += bfield(7, graph_body)
    return out + bfield(8, bfield(1, "") + vfield(2, 17))


INLINE_MODEL = model(graph(tensor(raw=b"\0" * 16)))


def external_model(location: str = "weights.bin", **extra: str) -> bytes:
    return model(graph(tensor(external={"location": location, **extra})))


# --- file builders -------------------------------------------------------------------------


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def gguf_header(version: int = 3, tensors: int = 2, kvs: int = 1) -> bytes:
    counts = struct.pack("<II", tensors, kvs) if version == 1 else struct.pack("<QQ", tensors, kvs)
    return b"GGUF" + struct.pack("<I", version) + counts


Member = tuple[tarfile.TarInfo, bytes]


def member(name: str, data: bytes = b"", type_: bytes = tarfile.REGTYPE, link: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, link
    info.size = len(data) if type_ == tarfile.REGTYPE else 0
    return info, data


def make_tar(path: Path, members: list[Member], gz: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def hf_members(prefix: str = "") -> list[Member]:
    return [
        member(f"{prefix}config.json", b'{"model_type": "bert"}'),
        member(f"{prefix}model.safetensors", b"\x08\0\0\0\0\0\0\0{}      " + b"\1" * 700),
        member(f"{prefix}tokenizer.json", b"{}"),
    ]


def reason(path: Path, fmt: str, **kwargs: int) -> str:
    with pytest.raises(ArtifactFormatError) as caught:
        inspect_artifact(path, fmt, **kwargs)
    return str(caught.value)


# --- declared format and sniffing ----------------------------------------------------------


def test_unknown_format_lists_known_ones(tmp_path: Path) -> None:
    msg = reason(write(tmp_path / "m", INLINE_MODEL), "pytorch")
    assert "unknown format 'pytorch'" in msg
    assert all(fmt in msg for fmt in KNOWN_FORMATS)


def test_empty_file(tmp_path: Path) -> None:
    assert "empty (0 bytes)" in reason(write(tmp_path / "m", b""), "onnx")


@pytest.mark.parametrize(
    ("content", "declared", "expected"),
    [
        (gguf_header(), "onnx", "declared format 'onnx' but the content is a GGUF file"),
        (INLINE_MODEL, "gguf", "declared format 'gguf' but the content is an ONNX model"),
        (INLINE_MODEL, "hf-safetensors", "'hf-safetensors' but the content is an ONNX model"),
        (b"PK\3\4 a zip file", "onnx", "neither a tar, a GGUF file nor an ONNX model"),
        (b"\x1f\x8b\x08 not really gzip", "gguf", "the content is a gzip stream"),
    ],
)
def test_content_must_match_declared_format(
    tmp_path: Path, content: bytes, declared: str, expected: str
) -> None:
    assert expected in reason(write(tmp_path / "blob", content), declared)


def test_gguf_declared_but_tar(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "m.tar", [member("m.gguf", gguf_header())])
    assert "'gguf' but the content is a tar archive" in reason(path, "gguf")


def test_bzip2_tar_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "m.tar.bz2"
    with tarfile.open(path, "w:bz2") as tf:
        for info, data in hf_members():
            tf.addfile(info, io.BytesIO(data))
    assert "only plain or gzip-compressed tars" in reason(path, "hf-safetensors")


# --- gguf ----------------------------------------------------------------------------------


def test_bare_gguf_header_is_enough(tmp_path: Path) -> None:
    info = inspect_artifact(write(tmp_path / "m.gguf", gguf_header(tensors=2, kvs=0)), "gguf")
    assert (info.gguf_tensor_count, info.gguf_kv_count) == (2, 0)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_gguf_header(tmp_path: Path, version: int) -> None:
    path = write(tmp_path / "m.gguf", gguf_header(version, tensors=3, kvs=2) + b"\0" * 200)
    info = inspect_artifact(path, "gguf")
    assert (info.container, info.gguf_version, info.gguf_tensor_count) == ("file", version, 3)
    assert info.gguf_kv_count == 2
    assert info.files[0].size_bytes == path.stat().st_size


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (gguf_header(version=0), "unsupported GGUF version 0"),
        (gguf_header(version=4), "unsupported GGUF version 4"),
        (b"GGUF" + struct.pack(">IQQ", 3, 1, 1), "big-endian GGUF"),
        (b"GGUF\3\0", "GGUF header is truncated"),
        (gguf_header()[:20], "GGUF header is truncated: 20 of 24 bytes"),
    ],
)
def test_bad_gguf(tmp_path: Path, content: bytes, expected: str) -> None:
    assert expected in reason(write(tmp_path / "m.gguf", content), "gguf")


def test_sparse_200mb_gguf_uses_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.gguf"
    with path.open("wb") as fp:
        fp.write(gguf_header(tensors=1, kvs=1))
        fp.seek(200 * 1024 * 1024)
        fp.write(b"\0")
    tracemalloc.start()
    try:
        info = inspect_artifact(path, "gguf")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.files[0].size_bytes == 200 * 1024 * 1024 + 1
    assert peak < 10 * 1024 * 1024


# --- single-file onnx ----------------------------------------------------------------------


def test_single_onnx_file(tmp_path: Path) -> None:
    info = inspect_artifact(write(tmp_path / "model.onnx", INLINE_MODEL), "onnx")
    assert (info.format, info.container, info.onnx_model_file) == ("onnx", "file", "model.onnx")
    assert info.external_data_files == []
    assert info.gguf_version is None
    with pytest.raises(ValidationError):
        info.format = "gguf"  # type: ignore[misc]  # frozen


def test_single_onnx_with_external_data_needs_a_tar(tmp_path: Path) -> None:
    msg = reason(write(tmp_path / "m.onnx", external_model()), "onnx")
    assert "'weights.bin'" in msg
    assert "external data needs a tar holding the .onnx and its data files" in msg


def test_external_data_in_a_subgraph_attribute_is_found(tmp_path: Path) -> None:
    then_branch = graph(tensor("sub_w", external={"location": "sub.bin"}))
    attribute = bfield(1, "then_branch") + vfield(20, 5) + bfield(6, then_branch)  # type GRAPH
    body = model(graph(tensor(raw=b"\0" * 16), node=identity_node(attribute)))
    msg = reason(write(tmp_path / "m.onnx", body), "onnx")
    assert "'sub.bin' for tensor 'sub_w'" in msg


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (model(None), "has no graph (ModelProto field 7)"),
        (INLINE_MODEL[:-3], "remain (truncated file?)"),
        (
            vfield(1, 8) + varint(7 << 3 | 2) + varint(10**9) + b"\0" * 10,
            "declares 1000000000 bytes",
        ),
        (vfield(1, 8) + b"\xff\xff", "runs past the end"),
        (vfield(1, 8) + vfield(7, 3), "ModelProto.graph has wire type 0"),
        (vfield(1, 8) + varint(7 << 3 | 3), "wire type 3"),
        (model(graph(tensor("t", external={"offset": "0"}))), "external data without a 'location'"),
    ],
)
def test_bad_single_onnx(tmp_path: Path, content: bytes, expected: str) -> None:
    msg = reason(write(tmp_path / "m.onnx", content), "onnx")
    assert "m.onnx" in msg
    assert expected in msg


def _big_model_parts(n: int) -> tuple[bytes, bytes]:
    """(prefix, suffix) of a model whose initializer has ``n`` zero bytes of raw_data between."""
    tensor_head = vfield(1, 4) + vfield(2, 1) + bfield(8, "big") + varint(9 << 3 | 2) + varint(n)
    init_head = varint(5 << 3 | 2) + varint(len(tensor_head) + n)
    tail = bfield(1, identity_node()) + bfield(12, bfield(1, "y"))
    graph_len = len(init_head) + len(tensor_head) + n + len(tail)
    prefix = vfield(1, 8) + varint(7 << 3 | 2) + varint(graph_len) + init_head + tensor_head
    return prefix, tail + bfield(8, bfield(1, "") + vfield(2, 17))


def _peak_bytes(path: Path, fmt: str) -> tuple[ArtifactInfo, int]:
    tracemalloc.start()
    try:
        info = inspect_artifact(path, fmt)
        return info, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_sparse_200mb_onnx_is_walked_by_seeking(tmp_path: Path) -> None:
    n = 200 * 1024 * 1024
    prefix, suffix = _big_model_parts(n)
    path = tmp_path / "big.onnx"
    with path.open("wb") as fp:
        fp.write(prefix)
        fp.seek(n, io.SEEK_CUR)  # a hole: the raw_data bytes read as zeros, cost no disk
        fp.write(suffix)
    info, peak = _peak_bytes(path, "onnx")
    assert info.files[0].size_bytes == len(prefix) + n + len(suffix)
    assert peak < 10 * 1024 * 1024


def test_sparse_200mb_onnx_inside_a_tar_is_walked_by_seeking(tmp_path: Path) -> None:
    n = 200 * 1024 * 1024
    prefix, suffix = _big_model_parts(n)
    size = len(prefix) + n + len(suffix)
    info = tarfile.TarInfo("model/model.onnx")
    info.size = size
    path = tmp_path / "big.tar"
    with path.open("wb") as fp:
        fp.write(info.tobuf())
        fp.write(prefix)
        fp.seek(n, io.SEEK_CUR)
        fp.write(suffix + b"\0" * ((-size) % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE))
    result, peak = _peak_bytes(path, "onnx")
    assert result.onnx_model_file == "model/model.onnx"
    assert result.files[0].offset_bytes == tarfile.BLOCKSIZE
    assert peak < 10 * 1024 * 1024


# --- onnx tars -----------------------------------------------------------------------------


def test_onnx_tar_with_external_data(tmp_path: Path) -> None:
    weights = b"\1" * 16
    path = make_tar(
        tmp_path / "m.tar",
        [
            member("./model/", type_=tarfile.DIRTYPE),
            member("./model/model.onnx", external_model(offset="0", length="16")),
            member("./model/weights.bin", weights),
            member("./README.md", b"hello"),
        ],
    )
    info = inspect_artifact(path, "onnx")
    assert (info.container, info.compression) == ("tar", "none")
    assert info.onnx_model_file == "model/model.onnx"
    assert info.external_data_files == ["model/weights.bin"]
    entries = {entry.name: entry for entry in info.files}
    assert set(entries) == {"model/model.onnx", "model/weights.bin", "README.md"}  # no dirs
    blob = path.read_bytes()
    entry = entries["model/weights.bin"]
    assert blob[entry.offset_bytes : entry.offset_bytes + entry.size_bytes] == weights


def test_external_data_of_a_sparse_initializer_and_a_constant_attribute(tmp_path: Path) -> None:
    values = tensor("sv", external={"location": "./data/sparse.bin"})
    indices = tensor("si", raw=b"\0" * 8)
    sparse = bfield(1, values) + bfield(2, indices) + vfield(3, 4)  # SparseTensorProto
    constant = (
        bfield(1, "value") + vfield(20, 4) + bfield(5, tensor("c", external={"location": "c.bin"}))
    )
    body = model(graph(tensor(raw=b"\0" * 16), node=identity_node(constant)) + bfield(15, sparse))
    members = [
        member("model.onnx", body),
        member("data/sparse.bin", b"\1" * 16),
        member("c.bin", b"\2" * 16),
    ]
    info = inspect_artifact(make_tar(tmp_path / "m.tar", members), "onnx")
    assert sorted(info.external_data_files) == ["c.bin", "data/sparse.bin"]


def test_gzip_onnx_tar_inline(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "m.tgz", [member("model.onnx", INLINE_MODEL)], gz=True)
    info = inspect_artifact(path, "onnx")
    assert (info.compression, info.onnx_model_file, info.external_data_files) == (
        "gzip",
        "model.onnx",
        [],
    )


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ([member("a/m.onnx", external_model())], "references external data file 'weights.bin'"),
        (
            [member("a/m.onnx", external_model()), member("weights.bin", b"x")],
            "the tar has no file 'a/weights.bin'",
        ),
        (
            [member("a/m.onnx", external_model("../weights.bin")), member("weights.bin", b"x")],
            "'../weights.bin' has a '..' component",
        ),
        ([member("m.onnx", external_model("/etc/passwd"))], "'/etc/passwd' has an absolute path"),
        (
            [member("m.onnx", external_model(offset="8", length="16")), member("weights.bin")],
            "reads bytes 8..24 of 'weights.bin', which has only 0 bytes",
        ),
        (
            [member("m.onnx", external_model(offset="-1")), member("weights.bin", b"x")],
            "not an integer >= 0",
        ),
        ([member("README.md", b"x")], "exactly one *.onnx file; found none"),
        (
            [member("a.onnx", INLINE_MODEL), member("b.onnx", INLINE_MODEL)],
            "exactly one *.onnx file; found 2: a.onnx, b.onnx",
        ),
        ([member("m.onnx", b"\x08\x08:\x05ab")], "m.onnx is not a valid ONNX model"),
    ],
)
def test_bad_onnx_tar(tmp_path: Path, members: list[Member], expected: str) -> None:
    assert expected in reason(make_tar(tmp_path / "m.tar", members), "onnx")


# --- hf-safetensors tars -------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "./", "bert-tiny/"])
def test_hf_tar(tmp_path: Path, prefix: str) -> None:
    info = inspect_artifact(make_tar(tmp_path / "m.tar", hf_members(prefix)), "hf-safetensors")
    assert (info.format, info.container, info.onnx_model_file) == ("hf-safetensors", "tar", None)
    root = prefix.removeprefix("./")
    assert [e.name for e in info.files] == [
        f"{root}config.json",
        f"{root}model.safetensors",
        f"{root}tokenizer.json",
    ]
    assert all(e.offset_bytes % tarfile.BLOCKSIZE == 0 for e in info.files)


def test_hf_gzip_tar(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "m.tgz", hf_members("m/"), gz=True)
    assert inspect_artifact(path, "hf-safetensors").compression == "gzip"


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        (hf_members()[1:], "no config.json at its root or in a top-level folder"),
        (hf_members("a/b/"), "no config.json at its root or in a top-level folder"),
        (hf_members("a/") + hf_members("b/"), "config.json in several top-level folders"),
        ([m for m in hf_members() if "safetensors" not in m[0].name], "no *.safetensors file"),
        (hf_members("a/")[:1] + hf_members("b/")[1:], "no *.safetensors file under 'a/'"),
    ],
)
def test_bad_hf_tar(tmp_path: Path, members: list[Member], expected: str) -> None:
    assert expected in reason(make_tar(tmp_path / "m.tar", members), "hf-safetensors")


# --- unsafe and malformed tars -------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (member("/etc/config.json", b"{}"), "'/etc/config.json' has an absolute path"),
        (member("../evil", b"x"), "'../evil' has a '..' component"),
        (member("a/../../evil", b"x"), "'a/../../evil' has a '..' component"),
        (member("a\\..\\evil", b"x"), "contains a backslash"),
        (member("link", type_=tarfile.SYMTYPE, link="/etc/passwd"), "'link' is a symbolic link"),
        (member("hard", type_=tarfile.LNKTYPE, link="config.json"), "'hard' is a hard link"),
        (member("fifo", type_=tarfile.FIFOTYPE), "'fifo' is a FIFO"),
        (member("tty", type_=tarfile.CHRTYPE), "'tty' is a device file"),
        (member("sda", type_=tarfile.BLKTYPE), "'sda' is a device file"),
        (member("./config.json", b"{}"), "'./config.json' appears more than once"),
        (member("config.json/x/y", b"{}"), "'config.json' is a file but also a folder"),
    ],
)
def test_unsafe_tar_members(tmp_path: Path, bad: Member, expected: str) -> None:
    path = make_tar(tmp_path / "m.tar", [*hf_members(), bad])
    assert expected in reason(path, "hf-safetensors")


def test_too_many_members(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "m.tar", hf_members())
    assert "more than 2 members" in reason(path, "hf-safetensors", max_members=2)
    assert inspect_artifact(path, "hf-safetensors", max_members=3).files


def test_empty_tar(tmp_path: Path) -> None:
    assert "holds no files" in reason(make_tar(tmp_path / "m.tar", []), "hf-safetensors")
    only_dirs = make_tar(tmp_path / "d.tar", [member("a/", type_=tarfile.DIRTYPE)])
    assert "holds no files" in reason(only_dirs, "onnx")


def test_corrupt_header_after_first_member(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "m.tar", hf_members())
    blob = bytearray(path.read_bytes())
    second = 2 * tarfile.BLOCKSIZE  # header, one block of config.json data, next header
    blob[second] ^= 0xFF
    assert "invalid member header at byte 1024" in reason(write(path, bytes(blob)), "onnx")


def test_data_after_end_of_archive(tmp_path: Path) -> None:
    blob = make_tar(tmp_path / "m.tar", hf_members()).read_bytes()
    path = write(tmp_path / "m.tar", blob + b"\0" * 512 + b"hidden")
    assert "after its end-of-archive marker" in reason(path, "hf-safetensors")


def test_truncated_tar(tmp_path: Path) -> None:
    blob = make_tar(tmp_path / "m.tar", hf_members()).read_bytes()
    offset = 4 * tarfile.BLOCKSIZE + 100  # inside model.safetensors' data
    msg = reason(write(tmp_path / "t.tar", blob[:offset]), "hf-safetensors")
    assert "corrupt, truncated or not a tar" in msg


def test_gzip_that_is_not_a_tar(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gz", gzip.compress(b"just some text, not a tar" * 40))
    assert "gzip-compressed tar is corrupt, truncated or not a tar" in reason(path, "onnx")


def test_pre_posix_v7_tar_without_ustar_magic(tmp_path: Path) -> None:
    blob = bytearray(make_tar(tmp_path / "m.tar", hf_members()).read_bytes())
    offset = 0
    for _ in range(3):  # blank magic+version of each header, then fix its checksum
        header = blob[offset : offset + tarfile.BLOCKSIZE]
        header[257:265] = b"\0" * 8
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % sum(header)
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        blob[offset : offset + tarfile.BLOCKSIZE] = header
        offset += tarfile.BLOCKSIZE * (1 + -(-size // tarfile.BLOCKSIZE))
    path = write(tmp_path / "v7.tar", bytes(blob))
    assert path.read_bytes()[257:262] != b"ustar"
    assert len(inspect_artifact(path, "hf-safetensors").files) == 3


def test_safe_member_name() -> None:
    assert safe_member_name("./x") == "x"
    assert safe_member_name("a//./b/") == "a/b"
    assert safe_member_name("./") == ""
    for bad in ("/x", "C:/x", "..", "a/../b", "a\\b"):
        with pytest.raises(ArtifactFormatError):
            safe_member_name(bad)
