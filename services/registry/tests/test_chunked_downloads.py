"""A gateway holding an older variant fetches only the chunks it lacks (tensor-aligned cuts)."""

from __future__ import annotations

import asyncio
import io
import json
import random
import struct
import tarfile
from pathlib import Path

import httpx
import pytest

from slmops.chunking import ChunkManifest, assemble, index_local_chunks, plan_fetch
from slmops_registry.testing import RegistryUnderTest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TENSORS, TENSOR_BYTES = 24, 512 * 1024


def safetensors(tensors: list[bytes]) -> bytes:
    header: dict[str, object] = {}
    offset = 0
    for i, data in enumerate(tensors):
        header[f"layer.{i}.weight"] = {
            "dtype": "F32", "shape": [len(data) // 4], "data_offsets": [offset, offset + len(data)],
        }  # fmt: skip
        offset += len(data)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(tensors)


def hf_tar(tensors: list[bytes]) -> bytes:
    files = {"config.json": b'{"model_type": "bert"}', "model.safetensors": safetensors(tensors)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def publish(registry: RegistryUnderTest, data: bytes, version: str) -> dict[str, object]:
    digest = (await registry.upload(data)).json()["digest"]
    response = await registry.publish(
        digest, version=version, format="hf-safetensors", task="feature-extraction"
    )
    assert response.status_code == 201, response.text
    return dict(response.json()["manifest"])


async def fetch(
    client: httpx.AsyncClient, registry: RegistryUnderTest, digests: list[str]
) -> dict[str, bytes]:
    urls = (await registry.client.post("/v1/blobs/urls", json={"digests": digests})).json()["urls"]
    return {d: (await client.get(url)).content for d, url in urls.items()}


async def test_changed_variant_downloads_only_the_missing_chunks(
    registry: RegistryUnderTest, tmp_path: Path
) -> None:
    rng = random.Random(11)
    tensors = [rng.randbytes(TENSOR_BYTES) for _ in range(TENSORS)]
    changed = list(tensors)
    for i in (3, 11):  # ~8% of the tensors retrained
        changed[i] = rng.randbytes(TENSOR_BYTES)
    old_bytes, new_bytes = hf_tar(tensors), hf_tar(changed)
    old_manifest = await publish(registry, old_bytes, "1.0.0")
    new_manifest = await publish(registry, new_bytes, "1.1.0")
    held = tmp_path / "held-1.0.0.tar"
    held.write_bytes(old_bytes)  # what the gateway runs now

    async with httpx.AsyncClient() as http:
        chunk_docs = await fetch(
            http, registry, [old_manifest["chunks_digest"], new_manifest["chunks_digest"]]
        )
        old_chunks = ChunkManifest.from_json(chunk_docs[str(old_manifest["chunks_digest"])])
        new_chunks = ChunkManifest.from_json(chunk_docs[str(new_manifest["chunks_digest"])])
        local = await asyncio.to_thread(index_local_chunks, held, old_chunks)
        plan = plan_fetch(new_chunks, local.keys())
        fetched = await fetch(http, registry, plan.missing)

    def read_chunk(digest: str) -> bytes:
        if digest in fetched:
            return fetched[digest]
        offset, size = local[digest]
        with held.open("rb") as f:
            f.seek(offset)
            return f.read(size)

    target = tmp_path / "assembled-1.1.0.tar"
    await asyncio.to_thread(assemble, new_chunks, read_chunk, target)

    assert target.read_bytes() == new_bytes
    assert new_chunks.blob_digest == new_manifest["artifact"]["digest"]  # type: ignore[index]
    fetched_bytes = sum(len(b) for b in fetched.values())
    assert fetched_bytes == plan.fetch_bytes
    assert 2 * TENSOR_BYTES <= fetched_bytes <= 0.15 * len(new_bytes)  # the changed tensors


async def test_small_artifacts_are_not_chunked(registry: RegistryUnderTest) -> None:
    data = hf_tar([b"\0" * 1024])

    manifest = await publish(registry, data, "0.0.1")

    assert manifest["chunks_digest"] is None


async def test_batch_urls_name_missing_blobs(registry: RegistryUnderTest) -> None:
    missing = "sha256:" + "0" * 64

    response = await registry.client.post("/v1/blobs/urls", json={"digests": [missing]})

    assert response.status_code == 404
    assert missing in response.json()["detail"]
