"""What the validator judges is what the registry signed, never what an event claims.

An ``optimization.completed`` names a variant id, its artifact and its reference (the fp32
baseline). Before judging, the validator fetches the variant's signed manifest from the
registry, verifies its signature, and judges the bytes *that manifest* names; an event that
disagrees with it (another artifact, another parent, another class) is refused as forged and
dead-lettered with the reason, without a report: a signed "passed" can only ever be about the
bytes the registry vouches for. The report then carries both digests, and the registry checks
them against the variant before it signs the report.
"""

from __future__ import annotations

from slmops.events import OptimizationCompleted, PermanentError
from slmops.events.payloads import ArtifactRef
from slmops.manifests import ManifestSignatureError, SignedManifest, verify_manifest
from slmops.service.registry_api import RegistryClient
from slmops.trust import KeyRole, TrustedKeys, UntrustedKeyError


async def bound_to_manifest(
    done: OptimizationCompleted, registry: RegistryClient, keys: TrustedKeys
) -> tuple[OptimizationCompleted, SignedManifest]:
    """``done`` with its artifact and reference taken from the verified variant manifest, and
    that manifest; :class:`PermanentError` when the two disagree or the manifest is not genuine."""
    raw = await registry.variant(done.variant_id)
    if raw is None:
        raise PermanentError(
            f"variant {done.variant_id} is not in the registry: nothing vouches for the bytes "
            "this event names, so they are not judged"
        )
    try:
        signed = SignedManifest.model_validate(raw)
        verify_manifest(signed, keys.key(KeyRole.MANIFESTS, signed.signature.key_id))
    except (ValueError, ManifestSignatureError, UntrustedKeyError) as exc:
        raise PermanentError(
            f"the manifest of variant {done.variant_id} is not genuine: {exc}"
        ) from None
    manifest = signed.manifest
    details = manifest.details.get("reference")
    reference = ArtifactRef.model_validate(details) if isinstance(details, dict) else None
    claims = {
        "manifest digest": (done.manifest_digest or signed.digest, signed.digest),
        "artifact": (done.artifact.digest, manifest.artifact.digest),
        "parent": (done.parent_digest, manifest.parent_digest),
        "device class": (done.device_class, manifest.device_class),
        "model": (done.model_name, manifest.model_name),
    }
    if done.reference is not None:  # the baseline: the signed one, else the parent itself
        signed_baseline = reference.digest if reference else manifest.parent_digest
        claims["reference"] = (done.reference.digest, signed_baseline)
    wrong = [f"{what} {said} (signed: {signed_value})"
             for what, (said, signed_value) in claims.items() if said != signed_value]  # fmt: skip
    if wrong:
        raise PermanentError(
            f"optimization.completed for {done.variant_id} disagrees with the variant's signed "
            f"manifest {signed.digest}: {'; '.join(wrong)}; refused as forged, nothing judged"
        )
    bound = done.model_copy(update={"artifact": manifest.artifact,
                                    "reference": reference or done.reference,
                                    "manifest_digest": signed.digest})  # fmt: skip
    return bound, signed


async def signed_artifact(
    variant_id: str, registry: RegistryClient, keys: TrustedKeys
) -> tuple[ArtifactRef | None, str]:
    """The artifact the verified manifest of ``variant_id`` names (a re-optimization's regressed
    variant, measured beside its candidate), or None and why not."""
    raw = await registry.variant(variant_id)
    if raw is None:
        return None, f"the regressed variant {variant_id} is not in the registry"
    try:
        signed = SignedManifest.model_validate(raw)
        verify_manifest(signed, keys.key(KeyRole.MANIFESTS, signed.signature.key_id))
    except (ValueError, ManifestSignatureError, UntrustedKeyError) as exc:
        return None, f"the manifest of the regressed variant {variant_id} is not genuine: {exc}"
    return signed.manifest.artifact, ""
