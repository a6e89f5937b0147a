"""Bearer tokens: JWTs signed with Ed25519 (JWS ``alg: Ed25519``, RFC 9864) through joserfc.

The issuer's private key signs; every service verifies with the public key set (a JWKS file),
which may hold several keys during a rotation: a token names its key (``kid``), a new key is
added before tokens are minted with it, and the old one is removed once its tokens expired.
Verifiers re-read the file when it changes, so a rotation needs no restart.

Revocation: ``revoked.json`` beside the key set maps a subject to the time it was revoked;
every token of that subject issued until then is refused (a stolen gateway's or service's
token), tokens minted afterwards (a re-enrolment) work. The file is re-read on change: locally
at once, in Kubernetes as fast as a mounted ConfigMap updates (about a minute).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OKPKey
from joserfc.jwt import JWTClaimsRegistry

from slmops.auth.principals import Principal, Scope
from slmops.auth.watched import WatchedFile

ALGORITHM = "Ed25519"
ISSUER = "slmops"
AUDIENCE = "slmops"
_LEEWAY_S = 30  # clock skew tolerated between the issuer and a verifier


class TokenError(Exception):
    """A token that must not be trusted; the message says why (never echoes the token)."""


class NoKeysError(TokenError):
    """The verifier has no keys to check tokens with (a configuration problem)."""


def generate_signing_key() -> OKPKey:
    """A new Ed25519 issuer key whose ``kid`` is a random id."""
    return OKPKey.generate_key("Ed25519", parameters={"kid": secrets.token_hex(8)})


def public_jwk(key: OKPKey) -> dict[str, Any]:
    return dict(key.as_dict(private=False))


@dataclass(frozen=True)
class TokenIssuer:
    key: OKPKey
    issuer: str = ISSUER
    audience: str = AUDIENCE

    @classmethod
    def from_file(cls, path: Path) -> TokenIssuer:
        return cls(OKPKey.import_key(json.loads(path.read_text())))

    def mint(
        self, subject: str, scopes: frozenset[Scope], ttl_s: float,
        device_class: str | None = None,
    ) -> str:  # fmt: skip
        """``device_class``: a gateway's class (claim ``cls``); its token reads only what was
        made for that class."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": self.audience, "sub": subject,
            "iat": now, "nbf": now, "exp": now + int(ttl_s),
            "jti": secrets.token_hex(12), "scope": " ".join(sorted(scopes)),
        }  # fmt: skip
        if device_class is not None:
            claims["cls"] = device_class
        header = {"alg": ALGORITHM, "kid": self.key.kid, "typ": "JWT"}
        return jwt.encode(header, claims, self.key, algorithms=[ALGORITHM])


def revocations_file_for(keys_file: Path) -> Path:
    return keys_file.with_name("revoked.json")


def revoke(keys_file: Path, subject: str, at: float | None = None) -> Path:
    """Refuse every token of ``subject`` issued until now (``at``)."""
    path = revocations_file_for(keys_file)
    revoked = json.loads(path.read_text()) if path.exists() else {}
    revoked.setdefault("subjects", {})[subject] = at if at is not None else time.time()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(revoked, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


class TokenVerifier:
    """Checks signature, issuer, audience, expiry and revocation against a JWKS file (and the
    revocations beside it) it re-reads on change."""

    def __init__(self, keys_file: Path, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.keys_file = keys_file
        self._keys = WatchedFile(keys_file, lambda text: KeySet.import_key_set(json.loads(text)))
        self._revoked = WatchedFile(revocations_file_for(keys_file), json.loads)
        self._claims = JWTClaimsRegistry(
            leeway=_LEEWAY_S,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            sub={"essential": True},
            exp={"essential": True},
        )

    def _key_set(self) -> KeySet:
        try:
            keys = self._keys.read()
        except (OSError, ValueError, JoseError) as exc:
            raise NoKeysError(f"unreadable key set {self.keys_file}: {exc}") from None
        if keys is None:
            raise NoKeysError(f"no token verification keys at {self.keys_file}")
        return keys

    def verify(self, token: str) -> Principal:
        keys = self._key_set()
        try:
            decoded = jwt.decode(token, keys, algorithms=[ALGORITHM])
            self._claims.validate(decoded.claims)
        except (JoseError, ValueError) as exc:
            raise TokenError(f"invalid token: {_reason(exc)}") from None
        claims = decoded.claims
        try:
            revoked = self._revoked.read() or {}
            revoked_at = revoked.get("subjects", {}).get(str(claims["sub"]))
        except (OSError, ValueError) as exc:  # fail closed: an unreadable list trusts nobody
            raise TokenError(f"cannot read the revocation list: {exc}") from None
        if revoked_at is not None and int(claims.get("iat", 0)) <= float(revoked_at):
            raise TokenError(f"the credentials of {claims['sub']} were revoked")
        known = {s.value for s in Scope}
        scopes = frozenset(Scope(s) for s in str(claims.get("scope", "")).split() if s in known)
        return Principal(
            subject=str(claims["sub"]), scopes=scopes,
            token_id=str(claims.get("jti", "")), expires_at=int(claims["exp"]),
            device_class=str(claims["cls"]) if claims.get("cls") else None,
        )  # fmt: skip


def _reason(exc: Exception) -> str:
    description = getattr(exc, "description", None) or str(exc) or type(exc).__name__
    return str(description)
