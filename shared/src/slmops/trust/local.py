"""The local stack's trust root, made at `slmops up` on this (trusted) host.

The registry's manifest key is created here when missing (where the registry reads it in
``SLMOPS_ENV=local``), so the repository can vouch for it before any gateway asks. Each start
re-signs the timestamp (the repository is not frozen); a manifest key replaced by hand is
rotated in at once.
"""

from __future__ import annotations

import time
from pathlib import Path

from slmops.secretfiles import ensure_ed25519_key
from slmops.signatures import public_key_pem
from slmops.trust.keys import KeyRole, TrustedKey, TrustedKeys
from slmops.trust.repository import TrustRepository

#: Where the registry keeps its manifest signing key under ``var_dir`` in SLMOPS_ENV=local.
LOCAL_MANIFEST_KEY_RELPATH = Path("registry") / "signing-key.pem"
#: Where the rollout service keeps its assignment statement key in SLMOPS_ENV=local.
LOCAL_ASSIGNMENT_KEY_RELPATH = Path("rollout") / "assignment-key.pem"
_LOCAL_KEYS = {KeyRole.MANIFESTS: LOCAL_MANIFEST_KEY_RELPATH,
               KeyRole.ASSIGNMENTS: LOCAL_ASSIGNMENT_KEY_RELPATH}  # fmt: skip


def local_trust(var_dir: Path) -> TrustRepository:
    return TrustRepository(var_dir / "auth" / "tuf")


def pinned_root_file(var_dir: Path) -> Path:
    """What a local gateway pins: the first root (it follows the chain from there)."""
    return local_trust(var_dir).metadata_dir / "1.root.json"


def ensure_local_trust(var_dir: Path, old_until: int | None = None) -> TrustRepository:
    """The repository, vouching for the registry's manifest key and the rollout service's
    assignment key (each created when missing); a key replaced since is rotated in with the
    old one accepted until ``old_until`` (default: not at all)."""
    repository = local_trust(var_dir)
    current = {
        role: TrustedKey.of(_public_key(var_dir / path)) for role, path in _LOCAL_KEYS.items()
    }
    if not repository.exists():
        repository.init(TrustedKeys({role: (key,) for role, key in current.items()}))
        return repository
    keys = original = repository.keys()
    until = old_until if old_until is not None else int(time.time())
    for role, key in current.items():
        if not any(k.key_id == key.key_id and k.not_after is None for k in keys.roles[role]):
            keys = keys.rotated(role, key.public_key_pem, until)
    if keys != original:
        repository.publish(keys)
    else:
        repository.refresh_timestamp()
    return repository


def _public_key(path: Path) -> str:
    return public_key_pem(ensure_ed25519_key(path).public_key())
