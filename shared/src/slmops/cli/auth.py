"""``slmops auth``: mint tokens for people, scrapers and gateways; show who the CLI is.

Minting needs the issuer key (``<var_dir>/auth/issuer.jwk`` on the local stack, mode 0600):
whoever can read it is an admin of the platform's identities.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from slmops.auth import (
    ROLES,
    UnknownRoleError,
    ensure_local_credentials,
    local_credentials,
    scopes_of_role,
)
from slmops.cli.common import CliSettings, console_out, fail, parse_duration_s
from slmops.stack import identities
from slmops.stack.identities import enroll_gateway

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # a subject token: a site's name

app = typer.Typer(help="Credentials: tokens per principal, scoped and expiring.",
                  no_args_is_help=True)  # fmt: skip


@app.command("init")
def init() -> None:
    """Create the issuer key and key set under ``<var_dir>/auth`` (once) and mint a token per
    service, the admin, the simulator and a scraper (again each time): what `slmops up` does,
    for deployments that mint on a trusted host and ship each file to its one consumer."""
    creds = ensure_local_credentials(CliSettings().var_dir)
    names = sorted(p.stem for p in (creds.root / "tokens").glob("*.jwt"))
    console_out.print(f"issuer key {creds.issuer_key_file} (keep it here), public key set "
                      f"{creds.keys_file}, tokens: {', '.join(names)}", markup=False)  # fmt: skip


@app.command("token")
def token(
    role: Annotated[str, typer.Option(help=f"One of: {', '.join(sorted(ROLES))}.")],
    subject: Annotated[str, typer.Option(help="Who: user:alice, scraper:prometheus, ...")],
    ttl: Annotated[str, typer.Option(help="Lifetime: 15m, 8h, 30d.")] = "8h",
    out: Annotated[Path | None, typer.Option(help="Write the token to this file (0600).")] = None,
) -> None:
    """Mint a token for ``subject`` with ``role``'s scopes (printed, or written to --out)."""
    try:
        scopes = scopes_of_role(role)
    except UnknownRoleError as exc:
        fail(str(exc))
    creds = local_credentials(CliSettings().var_dir)
    if not creds.issuer_key_file.exists():
        fail(f"no issuer key at {creds.issuer_key_file}: start the local stack (`slmops up`)")
    minted = creds.issuer().mint(subject, scopes, parse_duration_s(ttl))
    if out is None:
        console_out.print(minted, markup=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.touch(mode=0o600)
    out.write_text(minted + "\n")
    console_out.print(f"{subject} ({role}: {' '.join(sorted(scopes))}) -> {out}", markup=False)


@app.command("enroll")
def enroll(
    gateway_id: Annotated[str, typer.Argument(help="The gateway's id.")],
    device_class: Annotated[
        str, typer.Option("--class", help="Its device class: it reads only that class's variants.")
    ],
    ttl: Annotated[str, typer.Option(help="Lifetime: 30d, 365d.")] = "30d",
    site: Annotated[
        str, typer.Option(help="Its site: it may send wave reports through that site's relay.")
    ] = "",
) -> None:
    """A gateway's own identity on the local stack: its API token and its NATS user (allowed
    its own reports, desired state and assignments only), files to hand to the device."""
    if site and not _TOKEN.fullmatch(site):
        fail(f"--site {site!r}: letters, digits, '-' and '_' only")
    var_dir = CliSettings().var_dir
    creds = local_credentials(var_dir)
    if not creds.issuer_key_file.exists():
        fail(f"no issuer key at {creds.issuer_key_file}: start the local stack (`slmops up`)")
    enrolled = enroll_gateway(var_dir, gateway_id, device_class, parse_duration_s(ttl), site)
    console_out.print(
        f"gateway:{gateway_id}: SLMOPS_AUTH_TOKEN_FILE={enrolled.token_file} "
        f"SLMOPS_NATS_NKEY_FILE={enrolled.nkey_file} "
        f"SLMOPS_GATEWAY_TRUST_ROOT_FILE={enrolled.trust_root_file} (hand the three to the "
        f"device; the first two are its secrets)"
        + (f"; SLMOPS_GATEWAY_SITE={site}" if site else ""), markup=False,
    )  # fmt: skip


@app.command("enroll-site")
def enroll_site_command(
    site: Annotated[str, typer.Argument(help="The site's name, as its gateways were enrolled.")],
) -> None:
    """A site relay's NATS user: it carries its site's gateways' wave reports as batches
    (`python -m slmops_gateway.relay`); it can publish nothing else."""
    if not _TOKEN.fullmatch(site):
        fail(f"site {site!r}: letters, digits, '-' and '_' only")
    nkey_file = identities.enroll_site(CliSettings().var_dir, site)
    console_out.print(
        f"site:{site}: SLMOPS_NATS_NKEY_FILE={nkey_file} SLMOPS_RELAY_SITE={site} "
        "(hand them to the relay beside the site's leaf node)",
        markup=False,
    )


@app.command("revoke")
def revoke_command(
    subject: Annotated[str, typer.Argument(help="gateway:<id>, service:<name>, user:<name>.")],
    keys_file: Annotated[
        Path | None,
        typer.Option(help="The key set whose revocation list to write (default: the local "
                     "stack's); services read revoked.json beside it."),
    ] = None,
) -> None:  # fmt: skip
    """Refuse SUBJECT everywhere at once (a stolen gateway or service credential): every
    token issued until now, on every service, and its NATS user, whose connection is closed.
    Tokens minted afterwards work; on the bus it needs enrolling again."""
    var_dir = CliSettings().var_dir
    path = keys_file or local_credentials(var_dir).keys_file
    if not path.exists():
        fail(f"no key set at {path}: start the local stack (`slmops up`) or pass --keys-file")
    done = identities.revoke_subject(var_dir, subject, path)
    console_out.print(f"{subject}: {'; '.join(done)}", markup=False)


@app.command("whoami")
def whoami() -> None:
    """The principal, scopes and expiry of the CLI's own token (as it claims them; the services
    check the signature)."""
    settings = CliSettings()
    path = settings.auth.token_path(settings.var_dir, "admin")
    try:
        claims = _claims(path.read_text().strip())
    except OSError:
        fail(f"no token at {path}: start the local stack or set SLMOPS_AUTH_TOKEN_FILE")
    except ValueError:
        fail(f"{path} does not hold a token")
    left_s = int(claims.get("exp", 0)) - time.time()
    state = f"expires in {left_s / 3600:.1f} h" if left_s > 0 else "EXPIRED"
    console_out.print(f"{claims.get('sub')}  scopes: {claims.get('scope')}  {state}  ({path})",
                      markup=False)  # fmt: skip


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    padded = payload + "=" * (-len(payload) % 4)
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
    return decoded
