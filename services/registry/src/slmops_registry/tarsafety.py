"""Tar member iteration and the safety checks every uploaded tar must pass.

A tar artifact is eventually extracted by some consumer (a runtime, an optimizer, a person with
``tar -x``), so the registry rejects anything an extractor could be tricked by: absolute or
escaping paths, links, device files, FIFOs, sparse files, duplicate or file-vs-folder names and
data hidden after the end-of-archive marker. Only headers are read; member data is seeked past.

``ArtifactFormatError`` lives here because it is the lowest layer of artifact inspection:
``protowire`` and ``formats`` both import it from this module, and ``formats`` re-exports it.
"""

from __future__ import annotations

import posixpath
import re
import tarfile

_CHUNK = 64 * 1024


class ArtifactFormatError(ValueError):
    """The artifact does not match its declared format; the message says why (HTTP 422)."""


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


def scan_members(tf: tarfile.TarFile, max_members: int) -> dict[str, tarfile.TarInfo]:
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
