"""`slmops auth`: tokens minted per role and subject, gateways enrolled, the CLI's identity."""

from __future__ import annotations

from pathlib import Path

import httpx
from typer.testing import CliRunner

from slmops.auth import LocalCredentials, Scope, TokenVerifier
from slmops.auth.bususers import local_bus_users
from slmops.cli.main import app


def cli(creds: LocalCredentials, *args: str) -> object:
    env = {"SLMOPS_VAR_DIR": str(creds.root.parent), "COLUMNS": "200"}
    return CliRunner().invoke(app, list(args), env=env)


def test_token_for_a_role_verifies_with_that_roles_scopes(
    credentials: LocalCredentials, tmp_path: Path
) -> None:
    out = tmp_path / "bob.jwt"
    minted = cli(credentials, "auth", "token", "--role", "operator", "--subject", "user:bob",
                 "--ttl", "15m", "--out", str(out))  # fmt: skip
    assert minted.exit_code == 0, minted.output  # type: ignore[attr-defined]
    principal = TokenVerifier(credentials.keys_file).verify(out.read_text().strip())
    assert (principal.subject, principal.scopes) == ("user:bob", {Scope.READ, Scope.OPERATE})
    assert oct(out.stat().st_mode & 0o777) == "0o600"


def test_unknown_role_and_bad_ttl_are_clear_errors(credentials: LocalCredentials) -> None:
    role = cli(credentials, "auth", "token", "--role", "root", "--subject", "user:x")
    assert role.exit_code == 1  # type: ignore[attr-defined]
    assert "unknown role 'root'; roles: admin," in role.output  # type: ignore[attr-defined]
    ttl = cli(credentials, "auth", "token", "--role", "viewer", "--subject", "u", "--ttl", "soon")
    assert ttl.exit_code == 2
    assert "15m, 8h or 30d" in ttl.output


def test_enroll_gives_a_gateway_its_own_identity(credentials: LocalCredentials) -> None:
    enrolled = cli(credentials, "auth", "enroll", "gw-berlin-7", "--class", "arm64-pi5")
    assert enrolled.exit_code == 0, enrolled.output  # type: ignore[attr-defined]
    principal = TokenVerifier(credentials.keys_file).verify(
        credentials.token("gateway-gw-berlin-7")
    )
    assert principal.gateway_id == "gw-berlin-7"
    assert principal.device_class == "arm64-pi5"
    assert principal.scopes == {Scope.GATEWAY}


def test_a_gateway_enrolled_at_a_site_may_ask_only_that_sites_relay(
    credentials: LocalCredentials,
) -> None:
    site = cli(credentials, "auth", "enroll-site", "berlin")
    enrolled = cli(credentials, "auth", "enroll", "gw-b1", "--class", "arm64-pi5", "--site",
                   "berlin")  # fmt: skip
    assert site.exit_code == 0, site.output  # type: ignore[attr-defined]
    assert enrolled.exit_code == 0, enrolled.output  # type: ignore[attr-defined]
    assert "SLMOPS_GATEWAY_SITE=berlin" in enrolled.output  # type: ignore[attr-defined]

    users = local_bus_users(credentials.root.parent).users()
    gateway, relay = users["gateway-gw-b1"].permissions(), users["site-berlin"].permissions()
    assert gateway.publish is not None
    assert relay.publish is not None
    assert "slmops.site.v1.berlin.report.gw-b1" in gateway.publish
    assert not any(s.startswith("slmops.site.v1.") and "berlin" not in s for s in gateway.publish)
    assert relay.publish == ("$JS.API.INFO", "slmops.gateway.reports.v1.berlin.*")
    assert relay.allow_responses  # it answers its gateways' requests
    conf = local_bus_users(credentials.root.parent).users_conf_file.read_text()
    assert "allow_responses: true" in conf


def test_a_site_name_that_is_no_subject_token_is_refused(credentials: LocalCredentials) -> None:
    for args in (("enroll-site", "ber.lin"), ("enroll", "gw-1", "--class", "c", "--site", "a*")):
        refused = cli(credentials, "auth", *args)
        assert refused.exit_code != 0
        assert "letters, digits" in refused.output  # type: ignore[attr-defined]


def test_whoami_names_the_clis_principal(credentials: LocalCredentials) -> None:
    who = cli(credentials, "auth", "whoami")
    assert who.exit_code == 0, who.output  # type: ignore[attr-defined]
    assert who.output.startswith("user:admin  scopes: admin metrics operate publish read")  # type: ignore[attr-defined]


def test_revoke_stops_a_stolen_gateway_token_on_a_running_service(
    credentials: LocalCredentials, registry_url: str
) -> None:
    credentials.mint_gateway("gw-stolen")
    token = credentials.token("gateway-gw-stolen")
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{registry_url}/v1/keys", headers=headers).status_code == 200

    revoked = cli(credentials, "auth", "revoke", "gateway:gw-stolen")

    assert revoked.exit_code == 0, revoked.output  # type: ignore[attr-defined]
    refused = httpx.get(f"{registry_url}/v1/keys", headers=headers)
    assert refused.status_code == 401
    assert "credentials of gateway:gw-stolen were revoked" in refused.json()["detail"]
    admin = {"Authorization": f"Bearer {credentials.token('admin')}"}
    assert httpx.get(f"{registry_url}/v1/keys", headers=admin).status_code == 200
