"""Turning a local path into one uploadable artifact for `slmops publish`.

A file is uploaded as it is; a folder is packed into a plain tar in a temp file first. The tar is
deterministic (sorted names, mtime 0, uid/gid 0, no owner names, normalised modes), so packing
the same folder twice gives the same digest, and holds only folders and regular files: symbolic
links and special files are refused, because the registry refuses them too and we would rather
say so before uploading gigabytes. Nothing here reads a file whole into memory.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, get_args

from slmops.events.payloads import ModelFormat, Task

FORMATS: tuple[str, ...] = get_args(ModelFormat)
TASKS: tuple[str, ...] = get_args(Task)
CHUNK_BYTES = 1024 * 1024


class PackagingError(Exception):
    """The path cannot be published as it is; the message says what to do."""


@dataclass(frozen=True)
class Prepared:
    """The file to upload (the path itself, or a temp tar of the folder) with its digest."""

    path: Path
    digest: str
    size_bytes: int
    packed: bool


def _pass_format(path: Path, why: str) -> PackagingError:
    return PackagingError(f"{why}: pass --format ({' | '.join(FORMATS)})")


def infer_format(path: Path) -> str:
    """The model format of ``path`` from its name or, for a folder, its top-level files."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".gguf", ".onnx"):
            return suffix[1:]
        raise _pass_format(path, f"cannot tell the format of {path} from its name")
    if not path.is_dir():
        raise PackagingError(f"{path} is neither a file nor a folder")
    names = [entry.name for entry in path.iterdir() if entry.is_file()]
    if "config.json" in names and any(name.endswith(".safetensors") for name in names):
        return "hf-safetensors"
    onnx = [name for name in names if name.lower().endswith(".onnx")]
    if len(onnx) == 1:
        return "onnx"
    raise _pass_format(
        path,
        f"cannot tell the format of folder {path}: it holds neither config.json with "
        f"*.safetensors nor exactly one *.onnx file ({len(onnx)} found)",
    )


def hash_file(path: Path) -> tuple[str, int]:
    """``("sha256:<hex>", size)`` of the file, read in chunks."""
    sha, size = hashlib.sha256(), 0
    with path.open("rb") as fp:
        while chunk := fp.read(CHUNK_BYTES):
            sha.update(chunk)
            size += len(chunk)
    return "sha256:" + sha.hexdigest(), size


def iter_chunks(path: Path, sent: Callable[[int], object]) -> Iterator[bytes]:
    """The file in 1 MiB chunks, calling ``sent(len(chunk))`` for each (a progress bar)."""
    with path.open("rb") as fp:
        while chunk := fp.read(CHUNK_BYTES):
            sent(len(chunk))
            yield chunk


def _entries(root: Path) -> list[tuple[str, Path, os.stat_result]]:
    """Every folder and regular file under ``root`` as (archive name, path, lstat), sorted."""
    found: list[tuple[str, Path, os.stat_result]] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as scan:
            for entry in scan:
                path = Path(entry.path)
                name = path.relative_to(root).as_posix()
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(info.st_mode):
                    target = os.readlink(path)
                    raise PackagingError(
                        f"{path} is a symbolic link (to {target}): the registry accepts only "
                        "regular files and folders; replace the link by a copy of its target"
                    )
                if stat.S_ISDIR(info.st_mode):
                    pending.append(path)
                elif not stat.S_ISREG(info.st_mode):
                    raise PackagingError(f"{path} is not a regular file (a device, FIFO or socket)")
                found.append((name, path, info))
    found.sort(key=lambda item: item[0])
    if not any(stat.S_ISREG(info.st_mode) for _, _, info in found):
        raise PackagingError(f"folder {root} holds no files")
    return found


def pack_directory(root: Path, out: BinaryIO) -> int:
    """Write a deterministic plain tar of ``root`` to ``out``; returns the number of members."""
    entries = _entries(root)  # every check passes before a byte is written
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path, info in entries:
            member = tarfile.TarInfo(name)
            member.mtime, member.uid, member.gid, member.uname, member.gname = 0, 0, 0, "", ""
            if stat.S_ISDIR(info.st_mode):
                member.type, member.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(member)
                continue
            member.mode = 0o755 if info.st_mode & stat.S_IXUSR else 0o644
            with path.open("rb") as data:
                member.size = os.fstat(data.fileno()).st_size
                tar.addfile(member, data)  # copies in chunks; fails if the file shrank
    return len(entries)


@contextmanager
def prepared_artifact(path: Path, model_format: str) -> Iterator[Prepared]:
    """The upload for ``path``: the file itself, or a temp tar of the folder (removed after)."""
    if path.is_file():
        yield Prepared(path, *hash_file(path), packed=False)
        return
    if not path.is_dir():
        raise PackagingError(f"{path} is neither a file nor a folder")
    if model_format == "gguf":
        raise PackagingError(f"a gguf artifact is a single .gguf file, but {path} is a folder")
    fd, name = tempfile.mkstemp(prefix="slmops-publish-", suffix=".tar")
    tar_path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            pack_directory(path, out)
        yield Prepared(tar_path, *hash_file(tar_path), packed=True)
    finally:
        tar_path.unlink(missing_ok=True)
