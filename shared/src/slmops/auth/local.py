"""Credentials of the local stack, minted into ``<var_dir>/auth`` at `slmops up`.

One issuer key (private, mode 0600) signs every token; ``jwks.json`` holds the public keys the
services verify with. Each principal gets its own token file: ``admin.jwt`` for the CLI,
``service-<name>.jwt`` per service, ``simulator.jwt`` for the fleet simulator, ``metrics.jwt``
for a scraper, ``gateway-<id>.jwt`` per enrolled gateway. Tokens are minted again at each
`slmops up`; clients re-read their file when it changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slmops.auth.bususers import ensure_local_bus_users
from slmops.auth.principals import SERVICES, Scope, scopes_of_role
from slmops.auth.tokens import TokenIssuer, generate_signing_key, public_jwk
from slmops.secretfiles import write_private
from slmops.trust.local import ensure_local_trust

LOCAL_TOKEN_TTL_S = 30 * 24 * 3600.0
#: The id of the gateway `slmops up` runs beside the services.
LOCAL_GATEWAY_ID = "local-gw-1"


@dataclass(frozen=True)
class LocalCredentials:
    root: Path  # <var_dir>/auth

    @property
    def keys_file(self) -> Path:
        return self.root / "jwks.json"

    @property
    def issuer_key_file(self) -> Path:
        return self.root / "issuer.jwk"

    def token_file(self, name: str) -> Path:
        return self.root / "tokens" / f"{name}.jwt"

    def token(self, name: str) -> str:
        return self.token_file(name).read_text().strip()

    def issuer(self) -> TokenIssuer:
        return TokenIssuer.from_file(self.issuer_key_file)

    def mint(
        self, name: str, subject: str, scopes: frozenset[Scope], ttl_s: float = LOCAL_TOKEN_TTL_S,
        device_class: str | None = None,
    ) -> Path:  # fmt: skip
        """Mint a token for ``subject`` into ``tokens/<name>.jwt`` (mode 0600)."""
        token = self.issuer().mint(subject, scopes, ttl_s, device_class)
        return write_private(self.token_file(name), token)

    def mint_gateway(
        self, gateway_id: str, ttl_s: float = LOCAL_TOKEN_TTL_S, device_class: str | None = None
    ) -> Path:
        """A gateway's own token; with ``device_class`` it reads only that class's variants."""
        return self.mint(f"gateway-{gateway_id}", f"gateway:{gateway_id}",
                         scopes_of_role("gateway"), ttl_s, device_class)  # fmt: skip


def local_credentials(var_dir: Path) -> LocalCredentials:
    return LocalCredentials(var_dir / "auth")


def ensure_local_credentials(var_dir: Path) -> LocalCredentials:
    """The issuer key and key set (created once), and fresh tokens for the local principals."""
    creds = local_credentials(var_dir)
    if not creds.issuer_key_file.exists():
        key = generate_signing_key()
        write_private(creds.issuer_key_file, json.dumps(key.as_dict(private=True)))
        keys = _read_key_set(creds.keys_file)
        keys.append(public_jwk(key))
        write_private(creds.keys_file, json.dumps({"keys": keys}, indent=1), mode=0o644)
    creds.mint("admin", "user:admin", scopes_of_role("admin"))
    creds.mint("metrics", "scraper:metrics", scopes_of_role("metrics"))
    creds.mint("simulator", "simulator:fleet", scopes_of_role("gateway"))
    for service in (*SERVICES, "console"):
        role = f"service:{service}"
        creds.mint(f"service-{service}", role, scopes_of_role(role))
    creds.mint_gateway(LOCAL_GATEWAY_ID)
    ensure_local_bus_users(var_dir, (LOCAL_GATEWAY_ID,))
    ensure_local_trust(var_dir)
    return creds


def _read_key_set(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    keys: list[dict[str, object]] = json.loads(path.read_text()).get("keys", [])
    return keys
