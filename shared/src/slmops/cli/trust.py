"""``slmops trust``: the trust root gateways pin (a TUF repository on this trusted host)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from slmops.cli.common import CliSettings, console_out, fail, parse_duration_s
from slmops.trust.keys import KeyRole
from slmops.trust.local import LOCAL_MANIFEST_KEY_RELPATH, ensure_local_trust, local_trust
from slmops.trust.repository import describe

app = typer.Typer(help="The trust root: which keys gateways believe (TUF).", no_args_is_help=True)


@app.command("status")
def status() -> None:
    """The root's version and expiry, and the keys it vouches for."""
    repository = local_trust(CliSettings().var_dir)
    if not repository.exists():
        fail(f"no trust root at {repository.root_dir}: start the local stack (`slmops up`)")
    console_out.print(describe(repository), markup=False)


@app.command("timestamp")
def timestamp() -> None:
    """Re-sign the timestamp (gateways refuse a repository whose timestamp expired, 7 days
    after the last signing: run it daily where the online key lives)."""
    repository = local_trust(CliSettings().var_dir)
    if not repository.exists():
        fail(f"no trust root at {repository.root_dir}: start the local stack (`slmops up`)")
    repository.refresh_timestamp()
    console_out.print(describe(repository), markup=False)


@app.command("rotate-manifest-key")
def rotate_manifest_key(
    grace: Annotated[str, typer.Option(help="How long the old key's signatures stay accepted.")]
    = "7d",
) -> None:  # fmt: skip
    """Give the local registry a new manifest signing key: gateways accept the old key's
    signatures for GRACE more, then refuse them. Restart the registry to sign with the new one."""
    var_dir = CliSettings().var_dir
    repository = local_trust(var_dir)
    if not repository.exists():
        fail(f"no trust root at {repository.root_dir}: start the local stack (`slmops up`)")
    old = repository.keys().current(KeyRole.MANIFESTS)
    key_file = var_dir / LOCAL_MANIFEST_KEY_RELPATH
    key_file.rename(key_file.with_name(f"signing-key.{old.key_id}.pem"))
    until = int(time.time() + parse_duration_s(grace))
    ensure_local_trust(var_dir, old_until=until)  # creates the new key and vouches for it
    new = repository.keys().current(KeyRole.MANIFESTS)
    console_out.print(
        f"manifest key {new.key_id} vouched for; {old.key_id} accepted until {until}. Restart "
        "the registry (`slmops down && slmops up`) to sign with the new key; manifests signed "
        "by the old one are refused after that time.", markup=False,
    )  # fmt: skip
