"""Ed25519 signing key of the registry: load or (locally) create it, sign, verify.

Gateways and the rollout service verify manifests with the public key only; the private key is
a secret: it is never logged, and outside ``SLMOPS_ENV=local`` it must be configured explicitly.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from slmops.signatures import (
    PublicKeyLike,
    SigningKeyError,
    key_id_of,
    load_public_key,
    public_key_pem,
    raw_public_key,
    verify,
)
from slmops.trust.local import LOCAL_MANIFEST_KEY_RELPATH
from slmops_registry.settings import RegistrySettings

__all__ = [
    "PublicKeyLike",
    "RegistrySigner",
    "SigningKeyError",
    "key_id_of",
    "load_public_key",
    "load_signer",
    "verify",
]

log = logging.getLogger(__name__)

KEY_ENV = "SLMOPS_REGISTRY_SIGNING_KEY"
KEY_FILE_ENV = "SLMOPS_REGISTRY_SIGNING_KEY_FILE"
LOCAL_KEY_RELPATH = LOCAL_MANIFEST_KEY_RELPATH  # `slmops up` creates it first (trust root)


class RegistrySigner:
    """Holds the registry's Ed25519 private key; hands out only public material and signatures."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_key = private_key.public_key()
        self.key_id = key_id_of(self._public_key)

    @classmethod
    def from_pem(cls, pem: bytes | str, *, source: str = "PEM data") -> RegistrySigner:
        """Load an unencrypted PKCS8 PEM Ed25519 key; ``source`` names it in errors, not the key."""
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # cryptography's messages describe the format problem, never the key bytes.
            raise SigningKeyError(
                f"{source} is not an unencrypted PKCS8 PEM private key: {exc}"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"{source} holds a {type(key).__name__}, expected an Ed25519 key")
        return cls(key)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public_key

    def public_key_raw(self) -> bytes:
        """The 32-byte raw public key."""
        return raw_public_key(self._public_key)

    def public_key_pem(self) -> str:
        return public_key_pem(self._public_key)

    def public_jwk(self) -> dict[str, str]:
        """The public key as an RFC 8037 OKP JWK, for clients that fetch keys over HTTP."""
        x = base64.urlsafe_b64encode(self.public_key_raw()).rstrip(b"=").decode("ascii")
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": x,
            "kid": self.key_id,
            "alg": "EdDSA",
            "use": "sig",
        }

    def sign(self, data: bytes) -> str:
        """Ed25519 signature of ``data``, standard base64 (with padding)."""
        return base64.b64encode(self._private_key.sign(data)).decode("ascii")

    def __repr__(self) -> str:
        return f"RegistrySigner(key_id={self.key_id!r})"


def load_signer(settings: RegistrySettings) -> RegistrySigner:
    """The registry's signer: from settings, a file, or (local only) a generated key."""
    if settings.signing_key is not None and settings.signing_key.get_secret_value().strip():
        return RegistrySigner.from_pem(settings.signing_key.get_secret_value(), source=KEY_ENV)
    if settings.signing_key_file is not None:
        path = settings.signing_key_file
        return _read_key_file(path, f"{KEY_FILE_ENV}={path}")
    env = settings.platform.env
    if env == "local":
        return _load_or_create_local_key(settings.platform.var_dir / LOCAL_KEY_RELPATH)
    # A generated key in a shared environment would silently differ per replica and restart,
    # invalidating every signature gateways hold: fail fast instead.
    raise SigningKeyError(
        f"no manifest signing key configured and SLMOPS_ENV={env!r}: set {KEY_ENV} (Ed25519 "
        f"private key, PKCS8 PEM, unencrypted) or {KEY_FILE_ENV} (path to such a file); "
        "keys are generated automatically only with SLMOPS_ENV=local"
    )


def _read_key_file(path: Path, label: str) -> RegistrySigner:
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"{label}: signing key file does not exist") from None
    except OSError as exc:
        raise SigningKeyError(f"{label}: cannot read signing key file: {exc.strerror}") from None
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = 0
    if mode & 0o077:
        log.warning("signing key file %s is readable by group/others (mode %o)", path, mode)
    return RegistrySigner.from_pem(pem, source=label)


def _new_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _load_or_create_local_key(path: Path) -> RegistrySigner:
    """Load the local key, creating it once; concurrent first starts all end with one key.

    The key is written in full to a private temp file, then published with ``os.link``: like an
    ``O_EXCL`` create it fails if the final name exists, but it is atomic with the content, so
    readers never see a partial file. ``os.replace`` would clobber a key another process already
    published and started signing with; the loser of the race discards its key and re-reads.
    """
    label = f"local signing key {path}"
    if path.exists():
        return _read_key_file(path, label)
    key = _new_private_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # exact mode whatever the umask
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        log.info("another process created the local signing key first; using %s", path)
        return _read_key_file(path, label)
    except OSError as exc:
        raise SigningKeyError(
            f"cannot create {label}: {exc.strerror or exc}; set {KEY_ENV} or {KEY_FILE_ENV} instead"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    signer = RegistrySigner(key)
    log.info("generated local manifest signing key key_id=%s at %s", signer.key_id, path)
    return signer


def _fsync_dir(directory: Path) -> None:
    # Makes the new name durable; best effort because some platforms can't open directories.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
