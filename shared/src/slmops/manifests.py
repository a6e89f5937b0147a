"""Signed manifests: what the registry vouches for about a model version, variant or report.

In the SDK because every verifier (gateways, the rollout service) parses and checks them the
same way the registry writes them.

The signature covers :func:`canonical_json` of the manifest, so any two writers serialize a
manifest to the same bytes; the manifest's digest is the sha256 of those bytes, which makes a
manifest content-addressed like the blobs it references.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from slmops.events.payloads import (
    ArtifactRef,
    Digest,
    ModelFormat,
    ModelName,
    Recipe,
    Task,
    Token,
    Version,
)
from slmops.objectstore import check_digest
from slmops.signatures import PublicKeyLike, key_id_of, load_public_key, verify

MANIFEST_PREFIX = "manifests/sha256/"
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]  # JSON has no NaN/inf
_VARIANT_ONLY = ("parent_digest", "recipe", "device_class")


class Signer(Protocol):
    """What signs manifests (the registry's key holder): its key id and detached signatures."""

    key_id: str

    def sign(self, data: bytes) -> str: ...


class ManifestSignatureError(Exception):
    """A signed manifest's digest or signature does not match its content."""


class ManifestFormatError(ValueError):
    """Bytes that are not a well-formed signed manifest."""


class Manifest(BaseModel):
    """Immutable description of one model version (``model``), one optimized ``variant`` of it,
    or a validation ``report``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = Field(1, description="Manifest schema; bumped on breaking change.")
    kind: Literal["model", "variant", "report"] = Field(description="What the manifest describes.")
    model_name: ModelName = Field(description="Name of the model family.")
    version: Version = Field(description="Version of the published model.")
    format: ModelFormat = Field(description="Serialization format of the artifact.")
    task: Task | None = Field(None, description="Inference task; required except for reports.")
    artifact: ArtifactRef = Field(description="The blob this manifest describes.")
    parent_digest: Digest | None = Field(
        None, description="Variants only: digest of the artifact the variant was derived from."
    )
    recipe: Recipe | None = Field(None, description="Variants only: how it was optimized.")
    device_class: Token | None = Field(None, description="Variants only: the target device class.")
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form labels.")
    device_classes: list[Token] = Field(
        default_factory=list, description="Device classes the model targets; empty = all."
    )
    eval_set: ArtifactRef | None = Field(None, description="Evaluation data set, if published.")
    metrics: dict[str, FiniteFloat] = Field(
        default_factory=dict, description="Measured figures; units belong in the metric names."
    )
    details: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="Variants: how the optimizer got there (effective recipe, search trail, pass "
        "log). Free-form JSON, signed with the rest.",
    )
    validation_report_digest: Digest | None = Field(
        None, description="Digest of the validation report manifest of this artifact."
    )
    chunks_digest: Digest | None = Field(
        None, description="Digest of the chunk manifest, for chunked (delta) downloads."
    )
    subject_manifest_digest: Digest | None = Field(
        None, description="Reports only: the signed variant manifest the validator judged."
    )
    subject_artifact_digest: Digest | None = Field(
        None, description="Reports only: the artifact bytes the validator judged."
    )
    created_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="Creation time, UTC."
    )
    created_by: str = Field(min_length=1, description="Principal (user or service) that made it.")

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        # A naive time would be read differently on each host and change the signed bytes.
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("created_at needs a timezone (naive datetimes are ambiguous)")
        return value.astimezone(UTC)

    @field_validator("device_classes")
    @classmethod
    def _unique_classes(cls, value: list[Token]) -> list[Token]:
        duplicates = sorted({c for c in value if value.count(c) > 1})
        if duplicates:
            raise ValueError(f"device_classes lists {', '.join(duplicates)} more than once")
        return value

    @model_validator(mode="after")
    def _kind_rules(self) -> Manifest:
        present = [name for name in _VARIANT_ONLY if getattr(self, name) is not None]
        if self.kind == "variant" and len(present) != len(_VARIANT_ONLY):
            missing = [name for name in _VARIANT_ONLY if name not in present]
            raise ValueError(
                "a variant manifest needs parent_digest, recipe and device_class "
                f"(missing: {', '.join(missing)})"
            )
        if self.kind == "model" and present:
            raise ValueError(
                "a model manifest must not have parent_digest, recipe or device_class "
                f"(set: {', '.join(present)}); use kind='variant' for derived artifacts"
            )
        if self.kind != "report" and self.task is None:
            raise ValueError(f"a {self.kind} manifest needs a task")
        return self

    @field_serializer("created_at")
    def _iso_z(self, value: datetime) -> str:
        # Python's isoformat is a pure function of the value; "Z" is the common UTC spelling.
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class ManifestSignature(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    alg: Literal["Ed25519"] = Field("Ed25519", description="Signature algorithm.")
    key_id: str = Field(
        pattern=r"^[0-9a-f]{16}$", description="First 16 hex of sha256(raw public key)."
    )
    value: str = Field(description="Signature of canonical_json(manifest), standard base64.")


class SignedManifest(BaseModel):
    """A manifest with its digest and the registry's signature over its canonical bytes.

    Parsing checks the shape only; call :func:`verify_manifest` before trusting it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest: Manifest
    digest: Digest = Field(description="sha256 of canonical_json(manifest).")
    signature: ManifestSignature

    def to_json(self) -> bytes:
        """The stored document: canonical too, so re-uploads produce identical objects."""
        return _canonical(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, data: bytes | str) -> SignedManifest:
        """Parse a stored document; raises ManifestFormatError saying what is wrong."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            problems = "; ".join(_describe(err) for err in exc.errors()[:5])
            more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
            raise ManifestFormatError(f"malformed signed manifest: {problems}{more}") from None


def _describe(err: Any) -> str:
    where = ".".join(str(part) for part in err["loc"]) or "document"
    return f"{where}: {err['msg']}"


def _canonical(obj: object) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def canonical_json(manifest: Manifest) -> bytes:
    """The signed bytes: every field (defaults included), sorted keys, no whitespace, UTF-8."""
    return _canonical(manifest.model_dump(mode="json"))


def manifest_digest(manifest: Manifest) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(manifest)).hexdigest()


def manifest_key(digest: str) -> str:
    """Object-store key of the signed manifest with this digest."""
    return MANIFEST_PREFIX + check_digest(digest).removeprefix("sha256:") + ".json"


def sign_manifest(manifest: Manifest, signer: Signer) -> SignedManifest:
    data = canonical_json(manifest)
    return SignedManifest(
        manifest=manifest,
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        signature=ManifestSignature(key_id=signer.key_id, value=signer.sign(data)),
    )


def verify_manifest(signed: SignedManifest, public_key: PublicKeyLike) -> None:
    """Raise ManifestSignatureError unless ``signed`` is intact and signed by ``public_key``.

    ``public_key``: PEM (str/bytes), 32 raw bytes or an Ed25519PublicKey; an unusable key
    raises SigningKeyError (the verifier's configuration is wrong, not the manifest).
    """
    key = load_public_key(public_key)
    data = canonical_json(signed.manifest)
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != signed.digest:
        raise ManifestSignatureError(
            f"manifest digest mismatch: document says {signed.digest}, content hashes to {actual}"
        )
    expected_kid = key_id_of(key)
    if signed.signature.key_id != expected_kid:
        raise ManifestSignatureError(
            f"manifest {signed.digest} was signed with key_id {signed.signature.key_id}, "
            f"but the verifying key is {expected_kid}"
        )
    if not verify(key, data, signed.signature.value):
        raise ManifestSignatureError(
            f"Ed25519 signature of manifest {signed.digest} does not verify with key {expected_kid}"
        )
