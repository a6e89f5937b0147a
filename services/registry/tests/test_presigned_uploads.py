"""Large files go straight to the store through a presigned URL, then become a checked blob."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from slmops_registry.testing import RegistryUnderTest, gguf_bytes

pytestmark = pytest.mark.integration


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def put(ticket: dict[str, object], data: bytes) -> int:
    async with httpx.AsyncClient() as http:
        response = await http.put(
            str(ticket["url"]),
            content=data,
            headers=dict(ticket["headers"]),  # type: ignore[arg-type]
        )
    return response.status_code


async def test_presigned_upload_becomes_a_blob_that_can_be_published(
    registry: RegistryUnderTest,
) -> None:
    data = gguf_bytes(padding=b"\x05" * 200_000)
    ticket = (await registry.client.post("/v1/uploads", json={"size_bytes": len(data)})).json()

    status = await put(ticket, data)
    done = await registry.client.post(
        f"/v1/uploads/{ticket['upload_id']}/complete",
        json={"digest": sha(data), "size_bytes": len(data)},
    )
    published = await registry.publish(sha(data))

    assert status == 200
    assert done.status_code == 201
    assert done.json()["digest"] == sha(data)
    assert published.status_code == 201
    assert list(registry.context.store.list_objects("staging/")) == []


async def test_presigned_upload_with_the_wrong_digest_is_discarded(
    registry: RegistryUnderTest,
) -> None:
    data = gguf_bytes()
    ticket = (await registry.client.post("/v1/uploads", json={"size_bytes": len(data)})).json()
    await put(ticket, data)

    done = await registry.client.post(
        f"/v1/uploads/{ticket['upload_id']}/complete",
        json={"digest": sha(b"other"), "size_bytes": len(data)},
    )
    again = await registry.client.post(
        f"/v1/uploads/{ticket['upload_id']}/complete",
        json={"digest": sha(data), "size_bytes": len(data)},
    )

    assert done.status_code == 400
    assert "digest mismatch" in done.json()["detail"]
    assert list(registry.context.store.list_blobs()) == []
    assert list(registry.context.store.list_objects("staging/")) == []
    assert again.status_code == 404


async def test_presigned_upload_over_the_limit_and_odd_ids_are_refused(
    registry: RegistryUnderTest,
) -> None:
    too_big = await registry.client.post("/v1/uploads", json={"size_bytes": 1 << 40})
    odd = await registry.client.post(
        "/v1/uploads/..%2F..%2Fblobs/complete", json={"digest": sha(b"x"), "size_bytes": 1}
    )

    assert too_big.status_code == 413
    assert odd.status_code in (404, 422)
