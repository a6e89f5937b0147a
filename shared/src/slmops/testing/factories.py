"""Valid sample events for tests (each call makes a new id and digest)."""

from __future__ import annotations

import hashlib
import uuid

from slmops.events.envelope import CloudEvent, new_event
from slmops.events.payloads import ArtifactRef, ModelPublished


def sample_digest(seed: str | None = None) -> str:
    return "sha256:" + hashlib.sha256((seed or uuid.uuid4().hex).encode()).hexdigest()


def model_published(
    name: str = "all-minilm-l6-v2", version: str = "1.0.0", *, source: str = "/slmops/test"
) -> CloudEvent[ModelPublished]:
    digest = sample_digest()
    payload = ModelPublished(
        model_name=name,
        version=version,
        format="onnx",
        task="feature-extraction",
        artifact=ArtifactRef(
            digest=digest, size_bytes=1234, uri=f"s3://slmops/blobs/sha256/{digest[7:]}"
        ),
    )
    return new_event(payload, source=source)
