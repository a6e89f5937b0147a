"""Publishing a model version: check the artifact, sign its manifest, claim the version, emit.

The order makes every step safe to repeat and nothing visible before it is whole: blobs and
manifests are content-addressed (writing one twice is harmless, an unclaimed one is invisible
and garbage-collected), the version claim is atomic, and the ``model.published`` event has an
id derived from the version and manifest, so a retried publish is de-duplicated by JetStream.

An encoder (``feature-extraction``) is refused up front when nobody could tell which output
holds its embeddings (``slmops.embeddings``, the rule every service applies): an ONNX graph's
declared outputs are read without loading weights, and the publisher's hints
(``embedding_output``, ``pooling``) are checked against them, then recorded in the signed
manifest's ``details`` and passed on in ``model.published``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slmops.chunking import chunk_file
from slmops.embeddings import (
    EmbeddingChoiceError,
    OutputInfo,
    choose_embedding_output,
    onnx_type_name,
)
from slmops.events import CloudEvent, ModelPublished, derive_event_id, new_event
from slmops.events.payloads import (
    ArtifactRef,
    Digest,
    ModelFormat,
    ModelName,
    Pooling,
    Task,
    Token,
    Version,
)
from slmops.manifests import Manifest, SignedManifest, manifest_key, sign_manifest
from slmops.objectstore import BlobRef, CorruptObjectError, ObjectStore
from slmops_registry.boundaries import tensor_boundaries
from slmops_registry.catalog import VersionCatalog, VersionConflict
from slmops_registry.errors import RegistryError
from slmops_registry.evalsets import EvalSetError, check_eval_set
from slmops_registry.formats import ArtifactFormatError, ArtifactInfo, inspect_artifact
from slmops_registry.signing import RegistrySigner

SOURCE = "/slmops/registry"
Publish = Callable[[CloudEvent[Any]], Awaitable[object]]
_HINTS = ("embedding_output", "pooling")
#: How the optimizer's ``convert`` exports a Hugging Face encoder: hints are checked against it.
_HF_ENCODER_OUTPUTS = [OutputInfo("last_hidden_state", ("batch", "sequence", None), "float")]


class PublishRequest(BaseModel):
    """What a publisher says about a model version whose artifact is already uploaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: ModelName
    version: Version
    format: ModelFormat
    task: Task
    artifact_digest: Digest = Field(description="The uploaded artifact (POST /v1/blobs).")
    labels: dict[str, str] = Field(default_factory=dict)
    device_classes: list[Token] = Field(default_factory=list, description="Empty = every class.")
    eval_set_digest: Digest | None = Field(None, description="An uploaded JSONL evaluation set.")
    embedding_output: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="Encoders: the graph output holding the embeddings; default: chosen by "
        "shape and name (an ambiguous model is refused, naming its outputs).",
    )
    pooling: Pooling | None = Field(
        None,
        description="Encoders: mean or cls (token embeddings), none (already one vector per "
        "text); default: by the output's shape.",
    )

    def request_digest(self) -> str:
        # Hints left out are not part of the digest: publishes from before they existed match.
        unset = {k for k in _HINTS if getattr(self, k) is None}
        body = self.model_dump(mode="json", exclude=unset)
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    def hints(self) -> dict[str, Any]:
        """The embedding hints given, as the manifest's ``details`` record them."""
        return {k: getattr(self, k) for k in _HINTS if getattr(self, k) is not None}


@dataclass(frozen=True)
class Published:
    manifest: SignedManifest
    created: bool  # False: the same request had been published before
    event_id: str


@dataclass
class Publisher:
    store: ObjectStore
    catalog: VersionCatalog
    signer: RegistrySigner
    publish: Publish
    spool_dir: Path
    chunk_threshold_bytes: int = 8 * 1024 * 1024

    async def publish_version(self, request: PublishRequest, *, created_by: str) -> Published:
        artifact = await self.existing_blob(request.artifact_digest, "artifact")
        chunks_digest = await self.inspect_and_chunk(
            artifact, request.format, check=partial(check_embedding_output, request)
        )
        eval_set = None
        if request.eval_set_digest is not None:
            eval_set = await self.existing_blob(request.eval_set_digest, "evaluation set")
            await self._check_eval_set(eval_set)
        manifest = Manifest(
            schema_version=1,
            kind="model",
            model_name=request.model_name,
            version=request.version,
            format=request.format,
            task=request.task,
            artifact=artifact_ref(artifact, "application/octet-stream"),
            labels=request.labels,
            device_classes=request.device_classes,
            eval_set=artifact_ref(eval_set, "application/x-ndjson") if eval_set else None,
            chunks_digest=chunks_digest,
            details=request.hints(),
            created_at=datetime.now(UTC),
            created_by=created_by,
        )
        signed = sign_manifest(manifest, self.signer)
        await asyncio.to_thread(self.store.put_bytes, manifest_key(signed.digest), signed.to_json())
        try:
            record, created = await self.catalog.claim(
                request.model_name,
                request.version,
                manifest_digest=signed.digest,
                artifact_digest=request.artifact_digest,
                request_digest=request.request_digest(),
            )
        except VersionConflict as exc:
            raise RegistryError(409, str(exc)) from exc
        if not created:  # answer with the manifest of the first publish
            signed = await self.manifest(record.manifest_digest)
        event = published_event(signed)
        await self.publish(event)  # again on a repeat: same id, de-duplicated
        return Published(signed, created, event.id)

    async def manifest(self, digest: str) -> SignedManifest:
        raw = await asyncio.to_thread(self.store.get_bytes, manifest_key(digest))
        return SignedManifest.from_json(raw)

    async def existing_blob(self, digest: str, what: str) -> BlobRef:
        blob = await asyncio.to_thread(self.store.stat, digest)
        if blob is None:
            raise RegistryError(
                422, f"{what} {digest} is not in the store: upload it first (POST /v1/blobs)"
            )
        return blob

    async def _local_copy(self, blob: BlobRef) -> Path:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.spool_dir, suffix=".blob")
        os.close(fd)
        path = Path(name)
        try:
            await asyncio.to_thread(self.store.get_to_file, blob.digest, path)
        except CorruptObjectError as exc:
            path.unlink(missing_ok=True)
            raise RegistryError(422, f"stored object does not match its digest: {exc}") from exc
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    async def inspect_and_chunk(
        self,
        blob: BlobRef,
        declared_format: str,
        check: Callable[[ArtifactInfo], None] | None = None,
    ) -> str | None:
        """Check the artifact's format (and ``check`` it, which may raise RegistryError); store
        large ones also as chunks (for delta downloads).

        Returns the digest of the chunk manifest, or None for a blob below the threshold."""
        path = await self._local_copy(blob)
        try:
            info = await asyncio.to_thread(inspect_artifact, path, declared_format)
            if check is not None:
                check(info)
            if blob.size_bytes < self.chunk_threshold_bytes:
                return None
            return await asyncio.to_thread(self._store_chunks, path, info)
        except ArtifactFormatError as exc:
            raise RegistryError(422, f"artifact is not a valid {declared_format}: {exc}") from exc
        finally:
            path.unlink(missing_ok=True)

    def _store_chunks(self, path: Path, info: ArtifactInfo) -> str:
        """Chunks are blobs too (deduplicated across variants); the chunk manifest as well."""
        chunks = chunk_file(path, boundaries=tensor_boundaries(path, info))
        stored: set[str] = set()
        with path.open("rb") as source:
            for chunk in chunks.chunks:
                if chunk.digest in stored or self.store.exists(chunk.digest):
                    continue
                source.seek(chunk.offset_bytes)
                data = source.read(chunk.size_bytes)
                self.store.put_stream(
                    io.BytesIO(data), expected_digest=chunk.digest, expected_size=len(data)
                )
                stored.add(chunk.digest)
        body = chunks.to_json().encode()
        return self.store.put_stream(io.BytesIO(body), expected_digest=chunks.digest()).digest

    async def _check_eval_set(self, blob: BlobRef) -> None:
        path = await self._local_copy(blob)
        try:
            await asyncio.to_thread(check_eval_set, path)
        except EvalSetError as exc:
            raise RegistryError(422, f"evaluation set {blob.digest}: {exc}") from exc
        finally:
            path.unlink(missing_ok=True)


def artifact_ref(blob: BlobRef, media_type: str) -> ArtifactRef:
    return ArtifactRef(
        digest=blob.digest, size_bytes=blob.size_bytes, uri=blob.uri, media_type=media_type
    )


def check_embedding_output(request: PublishRequest, info: ArtifactInfo) -> None:
    """Refuse (422) an encoder whose embedding output the services could not tell, or hints
    that do not fit it; hints on another task are refused too (they would be ignored)."""
    if request.task != "feature-extraction":
        if request.hints():
            raise RegistryError(
                422,
                f"embedding_output and pooling describe an encoder's output; a {request.task} "
                "model has none: leave them out",
            )
        return
    if info.format == "onnx":
        outputs = [
            OutputInfo(o.name, o.shape, "non-tensor" if o.elem_type is None else
                       onnx_type_name(o.elem_type))
            for o in info.onnx_outputs
        ]  # fmt: skip
    elif info.format == "hf-safetensors":
        outputs = _HF_ENCODER_OUTPUTS
    else:
        return
    try:
        choose_embedding_output(outputs, name=request.embedding_output, pooling=request.pooling)
    except EmbeddingChoiceError as exc:
        raise RegistryError(422, f"embedding output: {exc}") from exc


def _hint(manifest: Manifest, key: str) -> Any:
    value = manifest.details.get(key) if manifest.kind == "model" else None
    return value if isinstance(value, str) else None


def published_event(signed: SignedManifest) -> CloudEvent[ModelPublished]:
    m = signed.manifest
    payload = ModelPublished(
        model_name=m.model_name,
        version=m.version,
        format=m.format,
        task=m.task,
        artifact=m.artifact,
        manifest_digest=signed.digest,
        labels=m.labels,
        device_classes=m.device_classes,
        eval_set=m.eval_set,
        embedding_output=_hint(m, "embedding_output"),
        pooling=_hint(m, "pooling"),
    )
    event_id = derive_event_id("model.published", m.model_name, m.version, signed.digest)
    return new_event(
        payload, source=SOURCE, event_id=event_id, subject=f"{m.model_name}/{m.version}"
    )
