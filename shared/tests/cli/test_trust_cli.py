"""`slmops trust`: the local trust root, its timestamp, a manifest key rotated with a grace."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from slmops.auth import LocalCredentials
from slmops.cli.main import app
from slmops.trust import KeyRole, UntrustedKeyError
from slmops.trust.local import LOCAL_MANIFEST_KEY_RELPATH, local_trust


def cli(creds: LocalCredentials, *args: str) -> object:
    env = {"SLMOPS_VAR_DIR": str(creds.root.parent), "COLUMNS": "200"}
    return CliRunner().invoke(app, list(args), env=env)


def test_rotating_the_manifest_key_keeps_the_old_one_for_its_grace(
    credentials: LocalCredentials,
) -> None:
    var_dir = credentials.root.parent
    repository = local_trust(var_dir)
    old = repository.keys().current(KeyRole.MANIFESTS)
    old_pem = (var_dir / LOCAL_MANIFEST_KEY_RELPATH).read_text()

    rotated = cli(credentials, "trust", "rotate-manifest-key", "--grace", "1h")

    assert rotated.exit_code == 0, rotated.output  # type: ignore[attr-defined]
    keys = repository.keys()
    new = keys.current(KeyRole.MANIFESTS)
    assert new.key_id != old.key_id
    assert (var_dir / LOCAL_MANIFEST_KEY_RELPATH).read_text() != old_pem  # the registry's next
    assert (var_dir / "registry" / f"signing-key.{old.key_id}.pem").read_text() == old_pem
    assert keys.key(KeyRole.MANIFESTS, old.key_id) == old.public_key_pem  # within the grace
    with pytest.raises(UntrustedKeyError, match="rotated out"):
        keys.key(KeyRole.MANIFESTS, old.key_id, now=time.time() + 3700)
    status = cli(credentials, "trust", "status").output  # type: ignore[attr-defined]
    assert old.key_id in status
    assert new.key_id in status


def test_timestamp_is_re_signed_with_a_new_version(credentials: LocalCredentials) -> None:
    repository = local_trust(credentials.root.parent)
    path = repository.metadata_dir / "timestamp.json"
    before = json.loads(path.read_text())["signed"]["version"]
    assert cli(credentials, "trust", "timestamp").exit_code == 0  # type: ignore[attr-defined]
    assert json.loads(path.read_text())["signed"]["version"] == before + 1
