"""Authentication and authorization: principals with scopes, signed expiring bearer tokens.

Why JWTs (joserfc, Ed25519) rather than mTLS or API keys: they are verified offline by every
service with a public key set (no call to an identity service per request), carry the
principal's scopes, expire, name their key for rotation, and browsers, Prometheus and OpenAI
clients all know how to send a bearer token.
"""

from slmops.auth.client import BearerToken, BearerTokenFile, MissingTokenError
from slmops.auth.local import LocalCredentials, ensure_local_credentials, local_credentials
from slmops.auth.principals import (
    ROLES,
    SERVICES,
    Principal,
    Scope,
    UnknownRoleError,
    scopes_of_role,
)
from slmops.auth.tokens import NoKeysError, TokenError, TokenIssuer, TokenVerifier, revoke

__all__ = [
    "ROLES",
    "SERVICES",
    "BearerToken",
    "BearerTokenFile",
    "LocalCredentials",
    "MissingTokenError",
    "NoKeysError",
    "Principal",
    "Scope",
    "TokenError",
    "TokenIssuer",
    "TokenVerifier",
    "UnknownRoleError",
    "ensure_local_credentials",
    "local_credentials",
    "revoke",
    "scopes_of_role",
]
