"""Publishing through the HTTP API, against real NATS and moto S3."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
import urllib.request

import pytest

from slmops.bus import Bus
from slmops.events import ModelPublished
from slmops.manifests import SignedManifest, verify_manifest
from slmops.testing.events import await_events, stream_count
from slmops.testing.s3 import open_multipart_uploads
from slmops_registry.testing import RegistryUnderTest, gguf_bytes

pytestmark = pytest.mark.integration


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def tar_of(members: dict[str, bytes], *, raw_names: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def test_publish_signs_a_manifest_that_verifies_with_the_public_key(
    registry: RegistryUnderTest, bus: Bus
) -> None:
    artifact = gguf_bytes(padding=b"\x01" * 4096)
    uploaded = (await registry.upload(artifact)).json()

    response = await registry.publish(uploaded["digest"], labels={"team": "edge"})
    keys = (await registry.client.get("/v1/keys")).json()
    (event,) = await await_events(bus, ModelPublished.event_type, count=1)

    assert response.status_code == 201
    signed = SignedManifest.model_validate(response.json())
    verify_manifest(signed, keys["pem"])  # raises if the signature does not verify
    assert signed.signature.key_id == keys["keys"][0]["kid"]
    assert signed.manifest.artifact.digest == sha(artifact) == uploaded["digest"]
    assert signed.manifest.artifact.size_bytes == len(artifact)
    assert signed.manifest.labels == {"team": "edge"}
    assert event.source == "/slmops/registry"
    assert event.data.manifest_digest == signed.digest
    assert event.id == response.headers["X-Event-Id"]
    fetched = (await registry.client.get("/v1/models/smollm2-135m/1.0.0")).json()
    assert fetched["digest"] == signed.digest


async def test_tampered_manifest_fails_verification(registry: RegistryUnderTest) -> None:
    digest = (await registry.upload(gguf_bytes())).json()["digest"]
    signed = SignedManifest.model_validate((await registry.publish(digest)).json())
    pem = (await registry.client.get("/v1/keys")).json()["pem"]
    forged = signed.model_copy(
        update={"manifest": signed.manifest.model_copy(update={"labels": {"x": "y"}})}
    )

    with pytest.raises(Exception, match=r"digest|signature"):
        verify_manifest(forged, pem)


async def test_repeated_publish_is_idempotent_and_emits_once(
    registry: RegistryUnderTest, bus: Bus
) -> None:
    digest = (await registry.upload(gguf_bytes())).json()["digest"]

    first = await registry.publish(digest)
    second = await registry.publish(digest)

    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["digest"] == second.json()["digest"]
    assert await stream_count(bus, "SLMOPS_PIPELINE", ModelPublished.event_type) == 1


async def test_same_version_with_different_content_is_a_conflict(
    registry: RegistryUnderTest,
) -> None:
    first = (await registry.upload(gguf_bytes(tensor_count=1))).json()["digest"]
    other = (await registry.upload(gguf_bytes(tensor_count=9))).json()["digest"]
    await registry.publish(first)

    response = await registry.publish(other)

    assert response.status_code == 409
    assert "already published" in response.json()["detail"]
    manifest = (await registry.client.get("/v1/models/smollm2-135m/1.0.0")).json()
    assert manifest["manifest"]["artifact"]["digest"] == first


async def test_concurrent_uploads_of_the_same_content_store_one_blob(
    registry: RegistryUnderTest,
) -> None:
    data = gguf_bytes(padding=b"\x07" * 100_000)

    responses = await asyncio.gather(*(registry.upload(data) for _ in range(6)))
    blobs = list(registry.context.store.list_blobs())

    assert {r.status_code for r in responses} == {201}
    assert {r.json()["digest"] for r in responses} == {sha(data)}
    assert [b.digest for b in blobs] == [sha(data)]


@pytest.mark.parametrize("size_mb", [0, 20], ids=["small", "multipart"])
async def test_upload_with_a_wrong_expected_digest_is_refused_and_not_stored(
    registry: RegistryUnderTest, size_mb: int
) -> None:
    data = gguf_bytes(padding=b"\x03" * (size_mb * 1024 * 1024))

    response = await registry.upload(data, **{"X-Expected-Digest": sha(b"something else")})

    assert response.status_code == 400
    assert response.json()["detail"].startswith("digest mismatch")
    assert list(registry.context.store.list_objects("")) == []
    assert open_multipart_uploads(registry.settings.platform) == []


async def test_large_upload_with_its_digest_streams_straight_into_the_store(
    registry: RegistryUnderTest,
) -> None:
    data = gguf_bytes(padding=b"\x04" * (20 * 1024 * 1024))  # several 8 MiB parts

    response = await registry.upload(data, **{"X-Expected-Digest": sha(data)})
    again = await registry.upload(data, **{"X-Expected-Digest": sha(data)})

    assert (response.status_code, again.status_code) == (201, 201)
    assert response.json()["digest"] == again.json()["digest"] == sha(data)
    assert response.json()["size_bytes"] == len(data)
    assert [o.key for o in registry.context.store.list_objects("")] == [
        f"blobs/sha256/{sha(data)[7:]}"
    ]  # no staging copy, no spool
    assert not registry.settings.spool_dir.exists()


async def test_upload_over_the_size_limit_is_refused(registry: RegistryUnderTest) -> None:
    too_big = b"\0" * (33 * 1024 * 1024)  # the fixture's limit is 32 MiB

    response = await registry.upload(too_big)

    assert response.status_code == 413
    assert "exceeds the limit" in response.json()["detail"]
    assert list(registry.context.store.list_blobs()) == []


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"model_name": "../../etc/passwd"}, "model_name"),
        ({"model_name": "Model With Spaces"}, "model_name"),
        ({"version": "1.0/../../x"}, "version"),
        ({"format": "pickle"}, "format"),
        ({"task": "image-generation"}, "task"),
        ({"artifact_digest": "md5:abc"}, "artifact_digest"),
    ],
    ids=["traversal", "spaces", "version-slash", "unknown-format", "unknown-task", "bad-digest"],
)
async def test_invalid_publish_requests_are_refused_with_the_field(
    registry: RegistryUnderTest, overrides: dict[str, str], field: str
) -> None:
    digest = (await registry.upload(gguf_bytes())).json()["digest"]

    response = await registry.publish(digest, **overrides)

    assert response.status_code == 422
    assert field in json.dumps(response.json()["detail"])
    assert (await registry.client.get("/v1/models")).json() == []


@pytest.mark.parametrize(
    "path", ["/v1/models/..%2Fetc/1", "/v1/models/a%20b/1", "/v1/models/a/%2E%2E"]
)
async def test_odd_names_in_paths_are_refused(registry: RegistryUnderTest, path: str) -> None:
    response = await registry.client.get(path)

    assert response.status_code in (404, 422)
    assert "passwd" not in response.text


async def test_content_that_is_not_the_declared_format_is_refused(
    registry: RegistryUnderTest,
) -> None:
    digest = (await registry.upload(b"PK\x03\x04 a zip, not gguf")).json()["digest"]

    response = await registry.publish(digest)

    assert response.status_code == 422
    assert "not a valid gguf" in response.json()["detail"]
    assert (await registry.client.get("/v1/models")).json() == []


@pytest.mark.parametrize(
    ("member", "reason"),
    [("/etc/config.json", "absolute"), ("../config.json", "..")],
    ids=["absolute", "dotdot"],
)
async def test_tar_with_unsafe_paths_is_refused(
    registry: RegistryUnderTest, member: str, reason: str
) -> None:
    data = tar_of({member: b"{}", "model.safetensors": b"\0" * 64})
    digest = (await registry.upload(data)).json()["digest"]

    response = await registry.publish(digest, format="hf-safetensors", task="feature-extraction")

    assert response.status_code == 422
    assert reason in response.json()["detail"]


async def test_artifact_that_was_never_uploaded_is_refused(registry: RegistryUnderTest) -> None:
    response = await registry.publish(sha(b"never uploaded"))

    assert response.status_code == 422
    assert "upload it first" in response.json()["detail"]


async def test_invalid_evaluation_set_is_refused_with_the_line(
    registry: RegistryUnderTest,
) -> None:
    artifact = (await registry.upload(gguf_bytes())).json()["digest"]
    eval_set = (await registry.upload(b'{"text": "fine"}\n{"text": \n')).json()["digest"]

    response = await registry.publish(artifact, eval_set_digest=eval_set)

    assert response.status_code == 422
    assert "line 2: not valid JSON" in response.json()["detail"]


async def test_download_url_serves_the_blob(registry: RegistryUnderTest) -> None:
    data = gguf_bytes(padding=b"abc")
    digest = (await registry.upload(data)).json()["digest"]

    answer = (await registry.client.get(f"/v1/blobs/{digest}/url")).json()
    fetched = await asyncio.to_thread(_fetch, answer["url"])

    assert fetched == data
    assert answer["ttl_s"] == registry.settings.download_url_ttl_s
