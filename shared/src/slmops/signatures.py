"""Ed25519 signatures, the verifying side: public keys, key ids, signature checks.

The registry signs manifests with its private key (``slmops_registry.signing``); gateways, the
rollout service and tests verify with the public key only, through this module.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

_RAW_PUBLIC_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
#: A public key as verifiers get it: SubjectPublicKeyInfo PEM, 32 raw bytes, or loaded.
PublicKeyLike = Ed25519PublicKey | bytes | str


class SigningKeyError(Exception):
    """The signing key is missing, unreadable or not an unencrypted Ed25519 PKCS8 PEM key."""


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    """SubjectPublicKeyInfo PEM: how keys are published (``/v1/keys``, ``keys.json``)."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of sha256 over the raw 32-byte public key."""
    return hashlib.sha256(raw_public_key(public_key)).hexdigest()[:16]


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """A public key from PEM (str or bytes), 32 raw bytes, or an already loaded key."""
    if isinstance(key, Ed25519PublicKey):
        return key
    data = key.encode("ascii", errors="replace") if isinstance(key, str) else key
    return _load_public_key(data)


@functools.lru_cache(maxsize=256)
def _load_public_key(data: bytes) -> Ed25519PublicKey:
    """Parsing PEM costs more than the signature check: a verifier sees few keys, many times."""
    try:
        if len(data) == _RAW_PUBLIC_KEY_BYTES and not data.startswith(b"-----"):
            return Ed25519PublicKey.from_public_bytes(data)
        loaded = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(
            f"not an Ed25519 public key (expected SubjectPublicKeyInfo PEM or 32 raw bytes): {exc}"
        ) from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise SigningKeyError(f"public key is a {type(loaded).__name__}, expected Ed25519")
    return loaded


def verify(public_key_pem_or_raw: PublicKeyLike, data: bytes, signature_b64: str) -> bool:
    """True iff ``signature_b64`` is a valid signature of ``data``; False on any bad signature.

    Only an unusable *key* raises (SigningKeyError): that is a configuration error of the
    verifier, while signatures come from outside and must never crash it.
    """
    public_key = load_public_key(public_key_pem_or_raw)
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError, TypeError):
        return False
    if len(signature) != _SIGNATURE_BYTES:
        return False
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
