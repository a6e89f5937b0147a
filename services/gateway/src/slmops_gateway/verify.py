"""Everything a gateway checks before it lets a model near its inference slot.

1. The variant's manifest is signed by the registry with a key the pinned trust root vouches for
   (``slmops.trust``: TUF, keys.json), names the assignment's artifact and targets this
   gateway's device class.
2. The variant has a signed validation report that passed, for this gateway's class, about
   exactly this variant manifest and these artifact bytes.
3. The assignment's model is the signed manifest's, its version is not older than the signed
   one (a release may reuse a variant made for an earlier version, never a later one), and the
   signed version is not lower than the running model's, unless a signed rollback says so.
4. The downloaded bytes hash to the manifest's digest (``download.py`` checks while it writes).

Any failure is a :class:`Refused` with a reason the gateway reports as ``failed``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from slmops.events import PermanentError
from slmops.events.payloads import DesiredModel
from slmops.manifests import (
    Manifest,
    ManifestFormatError,
    ManifestSignatureError,
    SignedManifest,
    verify_manifest,
)
from slmops.service.registry_api import RegistryClient
from slmops.trust import KeyRole, TrustedKeys, UntrustedKeyError


class Refused(Exception):
    """The gateway will not install this model; the message says why."""


@dataclass(frozen=True)
class Vouched:
    """A variant the registry vouches for, validated for this gateway's class."""

    manifest: Manifest
    manifest_digest: str
    report_digest: str


async def vouch(
    desired: DesiredModel,
    *,
    registry: RegistryClient,
    keys: TrustedKeys,
    device_class: str,
) -> Vouched:
    """Checks 1 and 2: the signed manifest and the signed, passed report for this class."""
    try:
        raw = await registry.manifest(desired.manifest_digest)
    except PermanentError as exc:  # e.g. no such manifest: the assignment names nothing real
        raise Refused(str(exc)) from None
    variant = _verified(raw, keys, "manifest")
    manifest = variant.manifest
    if variant.digest != desired.manifest_digest:
        raise Refused(
            f"the registry served manifest {variant.digest}, not {desired.manifest_digest}"
        )
    if manifest.kind != "variant" or manifest.artifact.digest != desired.artifact.digest:
        raise Refused(
            f"manifest {variant.digest} describes {manifest.kind} {manifest.artifact.digest}, "
            f"not the assigned artifact {desired.artifact.digest}"
        )
    if manifest.device_class != device_class:
        raise Refused(
            f"variant {desired.variant_id} is built for {manifest.device_class}, "
            f"this gateway is {device_class}"
        )
    body = await registry.variant_report(desired.variant_id)
    if body is None:
        raise Refused(f"variant {desired.variant_id} has no validation report")
    report = _verified(body["manifest"], keys, "validation report")
    labels = report.manifest.labels
    if labels.get("variant_id") != desired.variant_id:
        raise Refused(f"the report {report.digest} is about {labels.get('variant_id')}")
    judged = (report.manifest.subject_manifest_digest, report.manifest.subject_artifact_digest)
    if judged != (variant.digest, manifest.artifact.digest):
        raise Refused(
            f"the report {report.digest} judged manifest {judged[0]} / artifact {judged[1]}, "
            f"not this variant's {variant.digest} / {manifest.artifact.digest}"
        )
    if device_class not in report.manifest.device_classes:
        raise Refused(
            f"variant {desired.variant_id} was not validated for {device_class} "
            f"(its report covers {', '.join(report.manifest.device_classes) or 'no class'})"
        )
    if labels.get("verdict") != "passed":
        reason = str(body.get("report", {}).get("reason", ""))
        raise Refused(
            f"variant {desired.variant_id} failed validation for {device_class}"
            + (f": {reason}" if reason else "")
        )
    return Vouched(manifest, variant.digest, report.digest)


def check_assignment(desired: DesiredModel, manifest: Manifest) -> None:
    """Check 3a: the unsigned assignment agrees with what the registry signed."""
    if manifest.model_name != desired.model_name:
        raise Refused(
            f"the assignment says model {desired.model_name}, but variant {desired.variant_id} "
            f"is signed for {manifest.model_name}: refused as cross-assigned"
        )
    if version_key(desired.version) < version_key(manifest.version):
        raise Refused(
            f"the assignment says version {desired.version}, but variant {desired.variant_id} is "
            f"signed for the later version {manifest.version}"
        )


def check_version(desired_version: str, running_version: str | None, *, rollback: bool) -> None:
    """Check 3: never install a lower version unless told to roll back."""
    if running_version is None or rollback:
        return
    if version_key(desired_version) < version_key(running_version):
        raise Refused(
            f"downgrade from {running_version} to {desired_version} refused: "
            "only a signed rollback assignment may lower the version"
        )


@functools.lru_cache(maxsize=1024)  # a fleet's agents compare the same few versions
def version_key(version: str) -> tuple[Any, ...]:
    """PEP 440 order when the version is one (1.10 > 1.9, 1.0rc1 < 1.0), else natural order."""
    from packaging.version import InvalidVersion, Version

    try:
        return (1, Version(version))
    except InvalidVersion:
        parts = re.split(r"(\d+)", version)
        return (0, tuple(int(p) if p.isdigit() else p for p in parts))


def _verified(raw: dict[str, Any], keys: TrustedKeys, what: str) -> SignedManifest:
    try:
        signed = SignedManifest.model_validate(raw)
        public_key = keys.key(KeyRole.MANIFESTS, signed.signature.key_id)
        verify_manifest(signed, public_key)
    except UntrustedKeyError as exc:
        raise Refused(
            f"the {what} is signed by a key the trust root does not vouch for: {exc}"
        ) from None
    except (ManifestFormatError, ValueError) as exc:
        raise Refused(f"the {what} is malformed: {str(exc)[:300]}") from None
    except ManifestSignatureError as exc:
        raise Refused(f"the {what}'s signature does not verify: {exc}") from None
    return signed
