"""What a gateway checks before it installs a model, against a real registry (real NATS, moto
S3): the registry's signature, a passed validation report for the gateway's own class, no
downgrade without a rollback, and bytes that hash to the signed digest (resumed downloads)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.manifests import SignedManifest, sign_manifest
from slmops.objectstore import blob_key
from slmops.service.registry_api import RegistryClient
from slmops.settings import PlatformSettings
from slmops.testing.s3 import raw_s3_client
from slmops.trust import KeyRole, TrustedKey, TrustedKeys
from slmops_gateway.download import download
from slmops_gateway.verify import Refused, check_version, vouch
from slmops_registry.signing import RegistrySigner

pytestmark = [pytest.mark.integration]


def _trusting(public_key_pem: str) -> TrustedKeys:
    """What a trust root vouching for ``public_key_pem`` as the manifest key yields."""
    return TrustedKeys({KeyRole.MANIFESTS: (TrustedKey.of(public_key_pem),)})


def _registry(pipeline: Any) -> RegistryClient:
    return RegistryClient("http://registry", client=pipeline.registry)


async def test_a_validated_variant_is_vouched_for_and_downloaded_resumed(
    pipeline: Any, tiny_onnx: Callable[..., bytes], tmp_path: Path
) -> None:
    # setup
    data = tiny_onnx()
    desired = await pipeline.variant(data)
    registry = _registry(pipeline)
    key = _trusting(await registry.public_key_pem())

    # execute: vouch, then a download that resumes after half the bytes
    vouched = await vouch(desired, registry=registry, keys=key, device_class="test-cpu")
    hex_digest = desired.artifact.digest.removeprefix("sha256:")
    (tmp_path / f"{hex_digest}.partial").write_bytes(data[: len(data) // 2])
    fetched: list[int] = []

    async def count(response: httpx.Response) -> None:
        fetched.append(int(response.headers.get("content-length", -1)))

    async with httpx.AsyncClient(event_hooks={"response": [count]}) as client:
        url = await registry.download_url(desired.artifact.digest)
        path = await download(url, desired.artifact.digest, len(data), tmp_path, client)

    # assert
    assert vouched.manifest.device_class == "test-cpu"
    assert path.read_bytes() == data
    assert fetched == [len(data) - len(data) // 2]  # only the missing range travelled
    assert not (tmp_path / f"{hex_digest}.partial").exists()


async def test_tampered_artifact_is_refused_and_nothing_is_kept(
    pipeline: Any, tiny_onnx: Callable[..., bytes], tmp_path: Path
) -> None:
    data = tiny_onnx()
    desired = await pipeline.variant(data)
    settings = PlatformSettings()
    tampered = data[:-8] + b"\x00" * 8  # same size, different bytes: a swapped object
    await asyncio.to_thread(raw_s3_client(settings).put_object, Bucket=settings.s3_bucket,
                            Key=blob_key(desired.artifact.digest), Body=tampered)  # fmt: skip

    url = await _registry(pipeline).download_url(desired.artifact.digest)
    models = tmp_path / "models"
    async with httpx.AsyncClient() as client:
        with pytest.raises(Refused, match="tampered or corrupt artifact"):
            await download(url, desired.artifact.digest, len(data), models, client)
    assert list(models.iterdir()) == []


async def test_bad_signature_other_class_and_failed_validation_are_refused(
    pipeline: Any, tiny_onnx: Callable[..., bytes]
) -> None:
    desired = await pipeline.variant(tiny_onnx())
    registry = _registry(pipeline)
    key = _trusting(await registry.public_key_pem())
    rogue = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    with pytest.raises(Refused, match="trust root does not vouch for"):
        await vouch(desired, registry=registry, keys=_trusting(rogue.decode()),
                    device_class="test-cpu")  # fmt: skip
    real = key.current(KeyRole.MANIFESTS)  # the registry's key id, with another key's bytes
    substituted = TrustedKeys({KeyRole.MANIFESTS: (TrustedKey(real.key_id, rogue.decode()),)})
    with pytest.raises(Refused, match="signature does not verify"):
        await vouch(desired, registry=registry, keys=substituted, device_class="test-cpu")
    with pytest.raises(Refused, match="built for test-cpu, this gateway is test-npu"):
        await vouch(desired, registry=registry, keys=key, device_class="test-npu")

    failed = await pipeline.variant(tiny_onnx(hidden=32), verdict="failed", version="2.0.0")
    with pytest.raises(Refused, match=r"failed validation for test-cpu: parity.cosine_mean"):
        await vouch(failed, registry=registry, keys=key, device_class="test-cpu")


def test_a_downgrade_needs_a_rollback() -> None:
    with pytest.raises(Refused, match=r"downgrade from 1\.10\.0 to 1\.9\.0 refused"):
        check_version("1.9.0", "1.10.0", rollback=False)
    check_version("1.9.0", "1.10.0", rollback=True)
    check_version("1.10.0", "1.9.0", rollback=False)  # an upgrade (1.10 > 1.9)
    check_version("2026-01-10", "2026-01-9", rollback=False)  # natural order when not PEP 440
    check_version("1.0.0", None, rollback=False)  # nothing running yet


class _ReportAbout(RegistryClient):
    """The pipeline's registry, except its report of a variant comes signed by ``signer`` and
    says it judged ``judged`` (manifest digest, artifact digest): a registry that signs a report
    about other bytes, or a report swapped in transit."""

    def __init__(self, pipeline: Any, signer: Any, judged: tuple[str, str]) -> None:
        super().__init__("http://registry", client=pipeline.registry)
        self.signer, self.judged = signer, judged

    async def manifest(self, digest: str) -> dict[str, Any]:
        genuine = SignedManifest.model_validate(await super().manifest(digest))
        return sign_manifest(genuine.manifest, self.signer).model_dump(mode="json")

    async def variant_report(self, variant_id: str) -> dict[str, Any] | None:
        body = await super().variant_report(variant_id)
        assert body is not None
        genuine = SignedManifest.model_validate(body["manifest"]).manifest
        forged = genuine.model_copy(update={"subject_manifest_digest": self.judged[0],
                                            "subject_artifact_digest": self.judged[1]})  # fmt: skip
        return {**body, "manifest": sign_manifest(forged, self.signer).model_dump(mode="json")}


async def test_a_report_about_other_bytes_is_refused(
    pipeline: Any, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: a validated variant; a signer the gateway trusts in this test
    desired = await pipeline.variant(tiny_onnx())
    signer = RegistrySigner(Ed25519PrivateKey.generate())
    key = _trusting(signer.public_key_pem())
    signed_variant = sign_manifest(
        SignedManifest.model_validate(await _registry(pipeline).manifest(desired.manifest_digest))
        .manifest, signer,
    )  # fmt: skip
    other = await pipeline.variant(tiny_onnx(hidden=32), version="2.0.0")

    # execute / assert: the same report signed honestly passes; about other bytes it is refused
    honest = _ReportAbout(pipeline, signer, (signed_variant.digest, desired.artifact.digest))
    vouched = await vouch(desired, registry=honest, keys=key, device_class="test-cpu")
    assert vouched.manifest_digest == signed_variant.digest
    for judged in ((signed_variant.digest, other.artifact.digest),
                   (other.manifest_digest, desired.artifact.digest)):  # fmt: skip
        swapped = _ReportAbout(pipeline, signer, judged)
        with pytest.raises(Refused, match="judged manifest"):
            await vouch(desired, registry=swapped, keys=key, device_class="test-cpu")
