"""Helpers for tests of the registry and of services that talk to it (not used at run time)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from slmops.events import variant_id_for
from slmops.events.payloads import PassSpec, Recipe
from slmops_registry.context import RegistryContext
from slmops_registry.settings import RegistrySettings


def gguf_bytes(tensor_count: int = 2, padding: bytes = b"") -> bytes:
    """A GGUF v3 header (magic, version, tensor count, metadata count) and some payload."""
    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, 0) + padding


@dataclass
class RegistryUnderTest:
    app: FastAPI
    client: httpx.AsyncClient
    context: RegistryContext
    settings: RegistrySettings

    async def upload(self, data: bytes, **headers: str) -> httpx.Response:
        return await self.client.post("/v1/blobs", content=data, headers=headers)

    async def publish(self, digest: str, **overrides: object) -> httpx.Response:
        body = {
            "model_name": "smollm2-135m",
            "version": "1.0.0",
            "format": "gguf",
            "task": "text-generation",
            "artifact_digest": digest,
            **overrides,
        }
        return await self.client.post("/v1/models", json=body)


RECIPE = Recipe(name="q8", passes=[PassSpec(name="weight_only", config={"bits": 8})])


async def published_parent(registry: RegistryUnderTest) -> str:
    """The digest of a published GGUF model (version 1.0.0 of ``smollm2-135m``)."""
    digest = (await registry.upload(gguf_bytes(padding=b"parent"))).json()["digest"]
    assert (await registry.publish(digest)).status_code == 201
    return str(digest)


def variant_body(parent: str, artifact: str, **overrides: object) -> dict[str, object]:
    """A ``POST /v1/variants`` request for an arm64 variant of ``parent``."""
    return {
        "model_name": "smollm2-135m",
        "version": "1.0.0",
        "variant_id": variant_id_for(parent, RECIPE, "arm64"),
        "device_class": "arm64",
        "recipe": RECIPE.model_dump(mode="json"),
        "format": "gguf",
        "artifact_digest": artifact,
        "metrics": {"size_mb": 0.1},
        **overrides,
    }
