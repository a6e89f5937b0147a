"""Validated variants made by hand through the registry's HTTP API (tests and benchmarks that
need what a gateway is assigned, without running the optimizer and the validator)."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx

from slmops.events import ReleaseCreated, release_id_for, variant_id_for
from slmops.events.payloads import ArtifactRef, DesiredModel, PassSpec, Recipe, ReleaseEntry
from slmops.reports import ValidationReport


async def register_variant(
    registry: httpx.AsyncClient, data: bytes, *, model_name: str = "tiny",
    version: str = "1.0.0", device_class: str = "test-cpu", verdict: str = "passed",
) -> DesiredModel:  # fmt: skip
    """Publish ``data`` as an ONNX model, register it as-is as a variant for
    ``device_class`` and store a validation report with ``verdict``."""
    uploaded = await registry.post("/v1/blobs", content=data)
    assert uploaded.status_code == 201, uploaded.text
    published = await registry.post("/v1/models", json={
        "model_name": model_name, "version": version, "format": "onnx",
        "task": "feature-extraction", "artifact_digest": uploaded.json()["digest"],
        "device_classes": ["not-a-class"],  # the optimizer plans nothing: the variant is ours
    })  # fmt: skip
    assert published.status_code in (200, 201), published.text
    parent = ArtifactRef.model_validate(published.json()["manifest"]["artifact"])
    recipe = Recipe(name="as-is", passes=[PassSpec(name="convert")])
    variant_id = variant_id_for(parent.digest, recipe, device_class)
    stored = await registry.post("/v1/variants", json={
        "model_name": model_name, "version": version, "variant_id": variant_id,
        "device_class": device_class, "recipe": recipe.model_dump(mode="json"),
        "artifact_digest": parent.digest,
    })  # fmt: skip
    assert stored.status_code in (200, 201), stored.text
    report = ValidationReport(
        model_name=model_name, version=version, variant_id=variant_id,
        device_class=device_class, recipe_name="as-is", verdict=verdict, candidate=parent,
        started_at=datetime.now(UTC), duration_s=0.1,
        reason="" if verdict == "passed" else "parity.cosine_mean 0.5 < 0.98",
    )  # fmt: skip
    blob = (await registry.post("/v1/blobs", content=report.to_json())).json()
    body = {
        "report_digest": blob["digest"],
        "verdict": verdict,
        "variant_manifest_digest": stored.json()["digest"],
        "artifact_digest": parent.digest,
    }
    added = await registry.post(f"/v1/variants/{variant_id}/reports", json=body)
    assert added.status_code == 201, added.text
    return DesiredModel(model_name=model_name, version=version, variant_id=variant_id,
                        manifest_digest=stored.json()["digest"], artifact=parent)  # fmt: skip


def release_of(variants: dict[str, DesiredModel]) -> ReleaseCreated:
    """The release naming ``variants`` (device class -> variant) of one model version."""
    first = next(iter(variants.values()))
    return ReleaseCreated(
        release_id=release_id_for(first.model_name, first.version),
        model_name=first.model_name, version=first.version,
        entries=[ReleaseEntry(device_class=c, variant_id=v.variant_id, artifact=v.artifact,
                              manifest_digest=v.manifest_digest) for c, v in variants.items()],
    )  # fmt: skip
