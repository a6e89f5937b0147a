"""Tokens: minted, verified, refused when forged, expired, for another audience, or signed by a
key taken out of the key set; the local credentials as `slmops up` mints them."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import httpx
import pytest

from slmops.auth import (
    BearerTokenFile,
    MissingTokenError,
    NoKeysError,
    Scope,
    TokenError,
    TokenIssuer,
    TokenVerifier,
    ensure_local_credentials,
    revoke,
    scopes_of_role,
)
from slmops.auth.tokens import generate_signing_key, public_jwk


def write_keys(path: Path, *issuers: TokenIssuer) -> None:
    path.write_text(json.dumps({"keys": [public_jwk(i.key) for i in issuers]}))


def test_a_minted_token_names_its_principal_scopes_and_expiry(tmp_path: Path) -> None:
    issuer = TokenIssuer(generate_signing_key())
    write_keys(tmp_path / "jwks.json", issuer)
    before = time.time()
    principal = TokenVerifier(tmp_path / "jwks.json").verify(
        issuer.mint("user:alice", scopes_of_role("operator"), ttl_s=600)
    )
    assert principal.subject == "user:alice"
    assert principal.scopes == {Scope.READ, Scope.OPERATE}
    assert before + 590 < principal.expires_at <= time.time() + 600
    assert principal.token_id
    assert principal.gateway_id is None


@pytest.mark.parametrize("case", ["expired", "stranger", "audience", "tampered", "garbage"])
def test_untrustworthy_tokens_are_refused_with_a_reason(tmp_path: Path, case: str) -> None:
    issuer = TokenIssuer(generate_signing_key())
    write_keys(tmp_path / "jwks.json", issuer)
    verifier = TokenVerifier(tmp_path / "jwks.json")
    admin = scopes_of_role("admin")
    token = {
        "expired": lambda: issuer.mint("user:a", admin, ttl_s=-120),
        "stranger": lambda: TokenIssuer(generate_signing_key()).mint("user:a", admin, 60),
        "audience": lambda: TokenIssuer(issuer.key, audience="elsewhere").mint("user:a", admin, 60),
        "tampered": lambda: _tamper(issuer.mint("user:a", frozenset({Scope.READ}), 60)),
        "garbage": lambda: "not-a-token",
    }[case]()
    with pytest.raises(TokenError) as refused:
        verifier.verify(token)
    assert token not in str(refused.value)  # a refusal never echoes the credential


def _tamper(token: str) -> str:
    import base64

    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["scope"] = "admin read publish operate"  # escalate
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{header}.{forged}.{signature}"


def test_rotation_new_key_added_then_old_removed_without_restart(tmp_path: Path) -> None:
    keys = tmp_path / "jwks.json"
    old, new = TokenIssuer(generate_signing_key()), TokenIssuer(generate_signing_key())
    write_keys(keys, old)
    verifier = TokenVerifier(keys)
    old_token = old.mint("service:optimizer", scopes_of_role("service:optimizer"), 600)
    assert verifier.verify(old_token).subject == "service:optimizer"

    write_keys(keys, old, new)  # 1. publish the new key; both verify during the overlap
    new_token = new.mint("service:optimizer", scopes_of_role("service:optimizer"), 600)
    assert verifier.verify(old_token)
    assert verifier.verify(new_token)

    write_keys(keys, new)  # 2. retire the old key: its tokens stop working at once
    with pytest.raises(TokenError):
        verifier.verify(old_token)
    assert verifier.verify(new_token).subject == "service:optimizer"


def test_no_key_set_is_a_configuration_error_not_an_open_door(tmp_path: Path) -> None:
    issuer = TokenIssuer(generate_signing_key())
    with pytest.raises(NoKeysError):
        TokenVerifier(tmp_path / "missing.json").verify(issuer.mint("user:a", frozenset(), 60))


def test_local_credentials_one_token_per_principal_private_files(tmp_path: Path) -> None:
    creds = ensure_local_credentials(tmp_path / "var")
    verifier = TokenVerifier(creds.keys_file)
    subjects = {
        name: verifier.verify(creds.token(name))
        for name in ("admin", "metrics", "simulator", "service-registry", "service-optimizer",
                     "service-validator", "service-rollout", "gateway-local-gw-1")
    }  # fmt: skip
    assert subjects["admin"].subject == "user:admin"
    assert Scope.VARIANTS_WRITE not in subjects["admin"].scopes  # only the optimizer's
    assert subjects["service-optimizer"].scopes == scopes_of_role("service:optimizer")
    assert subjects["gateway-local-gw-1"].gateway_id == "local-gw-1"
    assert stat.S_IMODE(creds.issuer_key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.token_file("admin").stat().st_mode) == 0o600
    first_key = creds.keys_file.read_text()
    again = ensure_local_credentials(tmp_path / "var")  # a second `slmops up`: same key
    assert again.keys_file.read_text() == first_key
    assert verifier.verify(again.token("admin")).subject == "user:admin"


def test_a_client_sends_the_token_from_its_file_and_follows_changes(tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(200)

    token_file = tmp_path / "t.jwt"
    auth = BearerTokenFile(token_file)
    with httpx.Client(transport=httpx.MockTransport(handler), auth=auth) as client:
        with pytest.raises(MissingTokenError, match="SLMOPS_AUTH_TOKEN_FILE"):
            client.get("http://svc/x")
        token_file.write_text("first\n")
        client.get("http://svc/x")
        token_file.write_text("second-token\n")  # re-minted while the client runs
        client.get("http://svc/x")
    assert seen == ["Bearer first", "Bearer second-token"]


def test_a_revoked_subjects_tokens_are_refused_until_it_is_enrolled_again(
    tmp_path: Path,
) -> None:
    issuer = TokenIssuer(generate_signing_key())
    keys = tmp_path / "jwks.json"
    write_keys(keys, issuer)
    verifier = TokenVerifier(keys)
    stolen = issuer.mint("gateway:gw-7", scopes_of_role("gateway"), 600)
    other = issuer.mint("gateway:gw-8", scopes_of_role("gateway"), 600)
    assert verifier.verify(stolen).gateway_id == "gw-7"

    revoke(keys, "gateway:gw-7")

    with pytest.raises(TokenError, match="credentials of gateway:gw-7 were revoked"):
        verifier.verify(stolen)
    assert verifier.verify(other).gateway_id == "gw-8"  # only that subject
    time.sleep(1.1)  # tokens carry whole seconds: a re-enrolment is minted in a later one
    enrolled_again = issuer.mint("gateway:gw-7", scopes_of_role("gateway"), 600)
    assert verifier.verify(enrolled_again).gateway_id == "gw-7"


def test_an_unreadable_revocation_list_trusts_nobody(tmp_path: Path) -> None:
    issuer = TokenIssuer(generate_signing_key())
    write_keys(tmp_path / "jwks.json", issuer)
    (tmp_path / "revoked.json").write_text("{not json")
    with pytest.raises(TokenError, match="revocation list"):
        TokenVerifier(tmp_path / "jwks.json").verify(issuer.mint("user:a", frozenset(), 60))
