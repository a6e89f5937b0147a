"""The chunk manifest: how a blob splits into content-addressed chunks, and its errors."""

from __future__ import annotations

import hashlib
import json
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmops.chunking.gear import ALGORITHM
from slmops.objectstore import check_digest

KIB = 1024
MIB = 1024 * KIB
DEFAULT_MIN_SIZE_BYTES = 256 * KIB
DEFAULT_AVG_SIZE_BYTES = 1 * MIB
DEFAULT_MAX_SIZE_BYTES = 4 * MIB
MIN_AVG_SIZE_BYTES = 64  # the masks need log2(avg) - 2 >= 1 bits; below that, chunks are silly
MAX_MAX_SIZE_BYTES = 256 * MIB  # one chunk is held in memory by producer and consumer


class ChunkManifestError(ValueError):
    """A manifest (or its JSON) is malformed or inconsistent."""


class ChunkIntegrityError(Exception):
    """A chunk, or the blob assembled from chunks, doesn't match its digest or size."""

    def __init__(self, what: str, expected: object, actual: object) -> None:
        super().__init__(f"{what}: expected {expected}, got {actual}")
        self.what, self.expected, self.actual = what, expected, actual


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChunkerParams(_Frozen):
    """Which chunker cut the blob; the same parameters on the same bytes give the same chunks."""

    algorithm: Literal["fastcdc-gear-v1"] = ALGORITHM
    min_size_bytes: int = Field(DEFAULT_MIN_SIZE_BYTES, gt=0)
    avg_size_bytes: int = Field(DEFAULT_AVG_SIZE_BYTES, ge=MIN_AVG_SIZE_BYTES)
    max_size_bytes: int = Field(DEFAULT_MAX_SIZE_BYTES, le=MAX_MAX_SIZE_BYTES)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.min_size_bytes < self.avg_size_bytes < self.max_size_bytes:
            raise ValueError(
                "chunk sizes must satisfy min < avg < max, got "
                f"min_size_bytes={self.min_size_bytes}, avg_size_bytes={self.avg_size_bytes}, "
                f"max_size_bytes={self.max_size_bytes}"
            )
        return self


class Chunk(_Frozen):
    """One chunk: ``size_bytes`` bytes at ``offset_bytes`` of the blob, hashing to ``digest``."""

    offset_bytes: int = Field(ge=0)
    size_bytes: int = Field(gt=0)
    digest: str

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        return check_digest(v)


class ChunkManifest(_Frozen):
    """A blob (``blob_digest``, ``size_bytes``) as contiguous chunks, in order."""

    schema_version: Literal[1] = 1
    blob_digest: str
    size_bytes: int = Field(ge=0)
    chunks: list[Chunk]
    chunker: ChunkerParams

    @field_validator("blob_digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        return check_digest(v)

    @model_validator(mode="after")
    def _contiguous(self) -> Self:
        expected = 0
        for i, c in enumerate(self.chunks):
            if c.offset_bytes != expected:
                what = "gap before" if c.offset_bytes > expected else "overlap at"
                raise ValueError(
                    f"chunks must be contiguous from 0: {what} chunk {i}, which starts at "
                    f"{c.offset_bytes} instead of {expected}"
                )
            if c.size_bytes > self.chunker.max_size_bytes:
                raise ValueError(
                    f"chunk {i} has {c.size_bytes} bytes, more than max_size_bytes="
                    f"{self.chunker.max_size_bytes}"
                )
            expected += c.size_bytes
        if expected != self.size_bytes:
            raise ValueError(f"chunks sum to {expected} bytes but size_bytes={self.size_bytes}")
        return self

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): equal manifests give equal strings."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> ChunkManifest:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise ChunkManifestError(f"invalid chunk manifest: {exc}") from exc

    def digest(self) -> str:
        """``sha256:<hex>`` of :meth:`to_json`: names this manifest (e.g. as a blob)."""
        return "sha256:" + hashlib.sha256(self.to_json().encode()).hexdigest()
