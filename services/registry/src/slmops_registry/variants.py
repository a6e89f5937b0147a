"""Variants and validation reports: the derived artifacts, each with its own signed manifest.

The optimizer stores a variant through the registry (``POST /v1/variants``) before it emits
``optimization.completed`` with the manifest digest; the validator stores its report the same
way. A variant's id is derived from its parent artifact, recipe and device class, and the
registry recomputes it: a repeated or redelivered job gets the variant stored the first time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from slmops.bus.kvstate import values_matching
from slmops.events import variant_id_for
from slmops.events.payloads import Digest, ModelFormat, ModelName, Recipe, Token, Version
from slmops.manifests import Manifest, SignedManifest, manifest_key, sign_manifest
from slmops.objectstore import ObjectNotFoundError, blob_key
from slmops_registry.errors import RegistryError
from slmops_registry.publishing import Publisher, artifact_ref


class VariantRequest(BaseModel):
    """An optimized artifact of a published model version, already uploaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: ModelName
    version: Version
    variant_id: Token = Field(description="variant_id_for(parent artifact digest, recipe, class)")
    device_class: Token
    recipe: Recipe
    format: ModelFormat = "onnx"
    artifact_digest: Digest
    metrics: dict[str, float] = Field(default_factory=dict, description="Units in the names.")
    details: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="Effective recipe, search trail, pass log: kept in the signed manifest.",
    )


class ReportRequest(BaseModel):
    """A validation report (a JSON blob, already uploaded) about one variant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    report_digest: Digest
    verdict: str = Field(pattern=r"^(passed|failed)$")
    metrics: dict[str, float] = Field(default_factory=dict)
    # What the validator judged: it must be the variant as the registry signed it.
    variant_manifest_digest: Digest = Field(description="The variant manifest it verified.")
    artifact_digest: Digest = Field(description="The artifact bytes it judged.")


@dataclass
class Variants:
    publisher: Publisher
    kv: KeyValue  # variant id -> manifest digest; report of a variant -> manifest digest

    async def register(
        self, request: VariantRequest, *, created_by: str
    ) -> tuple[SignedManifest, bool]:
        """Store a variant's signed manifest; returns (manifest, created)."""
        publisher = self.publisher
        record = await publisher.catalog.get(request.model_name, request.version)
        if record is None:
            raise RegistryError(422, f"no published {request.model_name} {request.version}")
        parent = (await publisher.manifest(record.manifest_digest)).manifest
        expected = variant_id_for(parent.artifact.digest, request.recipe, request.device_class)
        if request.variant_id != expected:
            raise RegistryError(
                422,
                f"variant_id {request.variant_id} is not the one its inputs give ({expected}): "
                "use slmops.events.variant_id_for(parent digest, recipe, device class)",
            )
        existing = await self._get(f"variant.{request.variant_id}")
        if existing is not None:
            signed = await publisher.manifest(existing)
            if signed.manifest.artifact.digest != request.artifact_digest:
                raise RegistryError(
                    409,
                    f"variant {request.variant_id} is already stored with artifact "
                    f"{signed.manifest.artifact.digest}",
                )
            return signed, False
        artifact = await publisher.existing_blob(request.artifact_digest, "variant artifact")
        chunks_digest = await publisher.inspect_and_chunk(artifact, request.format)
        manifest = Manifest(
            kind="variant",
            model_name=request.model_name,
            version=request.version,
            format=request.format,
            task=parent.task,
            artifact=artifact_ref(artifact, "application/octet-stream"),
            parent_digest=parent.artifact.digest,
            recipe=request.recipe,
            device_class=request.device_class,
            metrics=request.metrics,
            details=request.details,
            chunks_digest=chunks_digest,
            created_at=datetime.now(UTC),
            created_by=created_by,
        )
        signed = await self._store(manifest)
        await self._claim(f"variant.{request.variant_id}", signed.digest)
        return signed, True

    async def add_report(
        self, variant_id: str, request: ReportRequest, *, created_by: str
    ) -> SignedManifest:
        """Store a signed report manifest for a variant (one per report blob)."""
        variant_digest = await self._get(f"variant.{variant_id}")
        if variant_digest is None:
            raise RegistryError(404, f"no variant {variant_id}")
        variant = (await self.publisher.manifest(variant_digest)).manifest
        judged = (request.variant_manifest_digest, request.artifact_digest)
        if judged != (variant_digest, variant.artifact.digest):
            raise RegistryError(
                409, f"the report judged manifest {judged[0]} / artifact {judged[1]}, but variant "
                f"{variant_id} is manifest {variant_digest} / artifact {variant.artifact.digest}",
            )  # fmt: skip
        report = await self.publisher.existing_blob(request.report_digest, "report")
        manifest = Manifest(
            kind="report",
            model_name=variant.model_name,
            version=variant.version,
            format=variant.format,
            artifact=artifact_ref(report, "application/json"),
            labels={"verdict": request.verdict, "variant_id": variant_id},
            device_classes=[variant.device_class] if variant.device_class else [],
            metrics=request.metrics,
            subject_manifest_digest=variant_digest,
            subject_artifact_digest=variant.artifact.digest,
            created_at=datetime.now(UTC),
            created_by=created_by,
        )
        signed = await self._store(manifest)
        await self.kv.put(f"report.{variant_id}.{report.digest[7:]}", signed.digest.encode())
        return signed

    async def manifest_of(self, variant_id: str) -> SignedManifest:
        digest = await self._get(f"variant.{variant_id}")
        if digest is None:
            raise RegistryError(404, f"no variant {variant_id}")
        return await self.publisher.manifest(digest)

    async def latest_report(self, variant_id: str) -> tuple[SignedManifest, dict[str, Any]]:
        """The newest report of a variant (by its manifest's created_at) and its parsed blob."""
        if await self._get(f"variant.{variant_id}") is None:
            raise RegistryError(404, f"no variant {variant_id}")
        digests = await self._values(f"report.{variant_id}.*")
        if not digests:
            raise RegistryError(
                404,
                f"variant {variant_id} has no validation report yet: is the validator running?",
            )
        signed = await asyncio.gather(*(self.publisher.manifest(d) for d in set(digests)))
        latest = max(signed, key=lambda s: (s.manifest.created_at, s.digest))
        digest = latest.manifest.artifact.digest
        try:
            raw = await asyncio.to_thread(self.publisher.store.get_bytes, blob_key(digest))
            report = json.loads(raw)
        except ObjectNotFoundError as exc:
            raise RegistryError(500, f"report blob {digest} is missing from the store") from exc
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise RegistryError(500, f"report blob {digest} is not valid JSON: {exc}") from exc
        if not isinstance(report, dict):
            raise RegistryError(500, f"report blob {digest} is not a JSON object")
        return latest, report

    async def indexed_manifests(self) -> set[str]:
        """Digests of every variant and report manifest this registry signed and indexed
        (garbage collection keeps them and what they reference)."""
        variants = await self._values("variant.*")
        reports = await self._values("report.*.*")
        return set(variants) | set(reports)

    async def _values(self, pattern: str) -> list[str]:
        """The current values of every key matching a subject ``pattern``."""
        return [v.decode() for v in await values_matching(self.kv, pattern) if v]

    async def _store(self, manifest: Manifest) -> SignedManifest:
        signed = sign_manifest(manifest, self.publisher.signer)
        store = self.publisher.store
        await asyncio.to_thread(store.put_bytes, manifest_key(signed.digest), signed.to_json())
        return signed

    async def _get(self, key: str) -> str | None:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return (entry.value or b"").decode() or None

    async def _claim(self, key: str, digest: str) -> None:
        # A concurrent job stored the same variant first: same inputs, same result.
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
            await self.kv.create(key, digest.encode())
