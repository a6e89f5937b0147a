"""Manifests: validation rules, canonical bytes, digest, signing and the stored document."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from slmops.manifests import (
    Manifest,
    ManifestFormatError,
    ManifestSignatureError,
    SignedManifest,
    canonical_json,
    manifest_digest,
    manifest_key,
    sign_manifest,
    verify_manifest,
)
from slmops.objectstore import InvalidDigestError
from slmops_registry.signing import RegistrySigner

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def artifact(digest: str = D1, size_bytes: int = 1234) -> dict[str, Any]:
    return {
        "digest": digest,
        "size_bytes": size_bytes,
        "uri": f"s3://slmops/blobs/sha256/{digest[7:]}",
        "media_type": "application/octet-stream",
    }


def variant_fields() -> dict[str, Any]:
    """A variant with every field set to a non-default value."""
    return {
        "schema_version": 1,
        "kind": "variant",
        "model_name": "minilm",
        "version": "1.0.0",
        "format": "onnx",
        "task": "feature-extraction",
        "artifact": artifact(),
        "parent_digest": D2,
        "recipe": {"name": "int8", "passes": [{"name": "quantize", "config": {"bits": 8}}]},
        "device_class": "arm64-small",
        "labels": {"team": "search", "tier": "gold"},
        "device_classes": ["arm64-small", "x86-large"],
        "eval_set": artifact(D3, 99),
        "metrics": {"latency_p95_ms": 12.5, "accuracy": 0.91},
        "validation_report_digest": D3,
        "chunks_digest": D1,
        "created_at": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        "created_by": "optimizer",
    }


def model_fields() -> dict[str, Any]:
    fields = variant_fields()
    fields.update(kind="model", parent_digest=None, recipe=None, device_class=None)
    return fields


def signer() -> RegistrySigner:
    return RegistrySigner(Ed25519PrivateKey.generate())


# --- validation -----------------------------------------------------------------------------


def test_variant_and_model_with_consistent_fields_are_valid() -> None:
    variant = Manifest.model_validate(variant_fields())
    model = Manifest.model_validate(model_fields())

    assert variant.recipe is not None
    assert variant.recipe.passes[0].name == "quantize"
    assert model.parent_digest is None


def test_variant_without_parent_names_the_rule() -> None:
    fields = variant_fields()
    fields["parent_digest"] = None

    with pytest.raises(ValidationError) as info:
        Manifest.model_validate(fields)

    message = str(info.value)
    assert "a variant manifest needs parent_digest, recipe and device_class" in message
    assert "missing: parent_digest" in message


def test_model_with_a_recipe_names_the_rule() -> None:
    fields = model_fields()
    fields["recipe"] = {"name": "int8", "passes": []}

    with pytest.raises(ValidationError, match=r"must not have parent_digest.*\(set: recipe\)"):
        Manifest.model_validate(fields)


def test_task_is_required_except_for_reports() -> None:
    fields = model_fields()
    fields["task"] = None

    with pytest.raises(ValidationError, match="a model manifest needs a task"):
        Manifest.model_validate(fields)
    fields["kind"] = "report"
    assert Manifest.model_validate(fields).task is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("extra_field", "x"),
        ("schema_version", 2),
        ("model_name", "Has Spaces"),
        ("parent_digest", "sha256:abc"),
        ("device_classes", ["a", "a"]),
        ("metrics", {"nan": float("nan")}),
        ("created_at", datetime(2025, 1, 2, 3, 4, 5)),  # naive
        ("created_by", ""),
    ],
)
def test_invalid_fields_are_rejected(field: str, value: object) -> None:
    fields = variant_fields()
    fields[field] = value

    with pytest.raises(ValidationError):
        Manifest.model_validate(fields)


def test_manifest_is_frozen() -> None:
    manifest = Manifest.model_validate(variant_fields())

    with pytest.raises(ValidationError):
        manifest.version = "2"  # type: ignore[misc]


# --- canonical JSON and digest --------------------------------------------------------------


def test_canonical_json_is_compact_sorted_utf8_with_z_times() -> None:
    fields = model_fields()
    fields["labels"] = {"owner": "zoë"}
    fields["created_at"] = datetime(2025, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))

    data = canonical_json(Manifest.model_validate(fields))

    parsed = json.loads(data.decode("utf-8"))
    assert data == json.dumps(
        parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    assert b'"created_at":"2025-01-02T03:04:05Z"' in data
    assert "zoë".encode() in data
    assert parsed["parent_digest"] is None  # defaults are signed too, so absence can't be forged


def test_canonical_json_ignores_field_and_dict_order() -> None:
    fields = variant_fields()
    reordered = dict(reversed(list(fields.items())))
    reordered["labels"] = dict(reversed(list(fields["labels"].items())))
    reordered["metrics"] = dict(reversed(list(fields["metrics"].items())))
    reordered["artifact"] = dict(reversed(list(fields["artifact"].items())))

    first = Manifest.model_validate(fields)
    second = Manifest.model_validate(reordered)

    assert list(first.labels) != list(second.labels)  # the orders really differ
    assert canonical_json(first) == canonical_json(second)
    assert manifest_digest(first) == manifest_digest(second)


ALTERNATIVES: dict[str, Any] = {
    "kind": "report",
    "model_name": "minilm2",
    "version": "1.0.1",
    "format": "gguf",
    "task": "text-generation",
    "artifact": artifact(size_bytes=1235),
    "parent_digest": D1,
    "recipe": {"name": "int8", "passes": [{"name": "quantize", "config": {"bits": 4}}]},
    "device_class": "arm64-large",
    "labels": {"team": "search", "tier": "silver"},
    "device_classes": ["x86-large", "arm64-small"],
    "eval_set": artifact(D3, 100),
    "metrics": {"latency_p95_ms": 12.5, "accuracy": 0.92},
    "details": {"search_trail": [{"attempt": 2, "change": "asymmetric"}]},
    "validation_report_digest": D2,
    "chunks_digest": None,
    "subject_manifest_digest": D2,
    "subject_artifact_digest": D3,
    "created_at": datetime(2025, 1, 2, 3, 4, 5, 1, tzinfo=UTC),
    "created_by": "someone-else",
}


def test_every_changeable_field_is_covered() -> None:
    assert set(ALTERNATIVES) == set(Manifest.model_fields) - {"schema_version"}


@pytest.mark.parametrize("field", sorted(ALTERNATIVES))
def test_changing_any_field_changes_canonical_json_and_digest(field: str) -> None:
    base = Manifest.model_validate(variant_fields())
    changed = Manifest.model_validate({**variant_fields(), field: ALTERNATIVES[field]})

    assert canonical_json(changed) != canonical_json(base)
    assert manifest_digest(changed) != manifest_digest(base)


def test_digest_is_sha256_of_canonical_json() -> None:
    manifest = Manifest.model_validate(variant_fields())

    digest = manifest_digest(manifest)

    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert digest == "sha256:" + hashlib.sha256(canonical_json(manifest)).hexdigest()


def test_manifest_key() -> None:
    assert manifest_key(D1) == f"manifests/sha256/{'1' * 64}.json"
    with pytest.raises(InvalidDigestError):
        manifest_key("sha256:../../etc/passwd")


# --- signing --------------------------------------------------------------------------------


def test_sign_and_verify_round_trip_through_json() -> None:
    registry = signer()
    signed = sign_manifest(Manifest.model_validate(variant_fields()), registry)

    restored = SignedManifest.from_json(signed.to_json())

    verify_manifest(restored, registry.public_key_pem())
    assert restored == signed
    assert restored.digest == manifest_digest(signed.manifest)
    assert restored.signature.alg == "Ed25519"
    assert restored.signature.key_id == registry.key_id
    assert signed.to_json() == restored.to_json()  # the stored document is canonical too


def test_tampered_manifest_fails_verification() -> None:
    registry = signer()
    signed = sign_manifest(Manifest.model_validate(variant_fields()), registry)
    document = json.loads(signed.to_json())
    document["manifest"]["metrics"]["accuracy"] = 0.99
    tampered = SignedManifest.from_json(json.dumps(document).encode())

    with pytest.raises(ManifestSignatureError, match="digest mismatch"):
        verify_manifest(tampered, registry.public_key_pem())


def test_tampered_manifest_with_recomputed_digest_fails_signature() -> None:
    registry = signer()
    signed = sign_manifest(Manifest.model_validate(variant_fields()), registry)
    forged = Manifest.model_validate({**variant_fields(), "created_by": "attacker"})
    tampered = signed.model_copy(update={"manifest": forged, "digest": manifest_digest(forged)})

    with pytest.raises(ManifestSignatureError, match=r"signature .* does not verify"):
        verify_manifest(tampered, registry.public_key_raw())


def test_tampered_signature_fails_verification() -> None:
    registry = signer()
    signed = sign_manifest(Manifest.model_validate(model_fields()), registry)
    other_sig = registry.sign(b"something else")
    tampered = signed.model_copy(
        update={"signature": signed.signature.model_copy(update={"value": other_sig})}
    )

    with pytest.raises(ManifestSignatureError, match="does not verify"):
        verify_manifest(tampered, registry.public_key_pem())


def test_wrong_key_fails_verification() -> None:
    signed = sign_manifest(Manifest.model_validate(model_fields()), signer())
    other = signer()

    with pytest.raises(ManifestSignatureError, match=f"verifying key is {other.key_id}"):
        verify_manifest(signed, other.public_key_pem())


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\x00garbage", "malformed signed manifest"),
        (b"not json at all", "Invalid JSON"),
        (b"", "Invalid JSON"),
        (b"[]", "malformed signed manifest"),
        (b"{}", "manifest: Field required"),
    ],
)
def test_from_json_rejects_malformed_input_clearly(data: bytes, expected: str) -> None:
    with pytest.raises(ManifestFormatError, match=re.escape(expected)):
        SignedManifest.from_json(data)


def test_from_json_names_each_bad_field() -> None:
    signed = sign_manifest(Manifest.model_validate(model_fields()), signer())
    document = json.loads(signed.to_json())
    document["digest"] = "sha256:x"
    document["signature"]["alg"] = "RSA"
    document["manifest"]["surprise"] = 1

    with pytest.raises(ManifestFormatError) as info:
        SignedManifest.from_json(json.dumps(document))

    message = str(info.value)
    assert "digest: String should match pattern" in message
    assert "signature.alg: Input should be 'Ed25519'" in message
    assert "manifest.surprise: Extra inputs are not permitted" in message
