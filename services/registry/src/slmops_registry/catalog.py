"""Which model versions exist: one JetStream KV entry per name/version, claimed atomically.

The claim is what makes "same name and version, different content" a 409 even when two
publishers race: JetStream's create-if-absent lets exactly one of them win, and a repeated
publish of the same request (same artifact, same metadata) finds its own claim and succeeds
again with the first manifest (idempotent), whatever its timestamp.
"""

from __future__ import annotations

from datetime import UTC, datetime

import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict

from slmops.bus import MODEL_VERSIONS_KV
from slmops.events.payloads import Digest, ModelName, Version

BUCKET = MODEL_VERSIONS_KV.bucket


class VersionRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_name: ModelName
    version: Version
    manifest_digest: Digest
    artifact_digest: Digest
    request_digest: Digest  # hash of the publish request's metadata, for idempotency
    published_at: datetime


class VersionConflict(Exception):
    def __init__(self, existing: VersionRecord) -> None:
        super().__init__(
            f"{existing.model_name} {existing.version} is already published with artifact "
            f"{existing.artifact_digest} (manifest {existing.manifest_digest})"
        )
        self.existing = existing


def token(value: str) -> str:
    """``value`` as one KV key token."""
    # KV keys are subject tokens: dots would split them and '+' is not allowed.
    return value.replace("=", "=3D").replace(".", "=2E").replace("+", "=2B")


def untoken(value: str) -> str:
    return value.replace("=2B", "+").replace("=2E", ".").replace("=3D", "=")


def version_key(model_name: str, version: str) -> str:
    return f"{token(model_name)}/{token(version)}"


class VersionCatalog:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def claim(
        self,
        model_name: str,
        version: str,
        *,
        manifest_digest: str,
        artifact_digest: str,
        request_digest: str,
    ) -> tuple[VersionRecord, bool]:
        """Record a new version; returns (record, created). The same request again is not a
        conflict (the first record, created=False); anything else is :class:`VersionConflict`."""
        record = VersionRecord(
            model_name=model_name,
            version=version,
            manifest_digest=manifest_digest,
            artifact_digest=artifact_digest,
            request_digest=request_digest,
            published_at=datetime.now(UTC),
        )
        key = version_key(model_name, version)
        try:
            await self.kv.create(key, record.model_dump_json().encode())
            return record, True
        except nats.js.errors.KeyWrongLastSequenceError:
            existing = await self.get(model_name, version)
            if existing is None:  # deleted in between: try once more
                await self.kv.create(key, record.model_dump_json().encode())
                return record, True
        if (existing.artifact_digest, existing.request_digest) != (
            artifact_digest,
            request_digest,
        ):
            raise VersionConflict(existing)
        return existing, False

    async def get(self, model_name: str, version: str) -> VersionRecord | None:
        try:
            entry = await self.kv.get(version_key(model_name, version))
        except nats.js.errors.KeyNotFoundError:
            return None
        return VersionRecord.model_validate_json(entry.value or b"")

    async def list(self, model_name: str | None = None) -> list[VersionRecord]:
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        if model_name is not None:
            keys = [k for k in keys if untoken(k.split("/", 1)[0]) == model_name]
        records = [await self.get(*map(untoken, key.split("/", 1))) for key in sorted(keys)]
        return [r for r in records if r is not None]
