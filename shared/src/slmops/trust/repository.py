"""The TUF repository of the trust root, kept on the trusted host that holds its keys.

Two keys: the *root* key signs ``root.json`` (which keys may sign which role; kept offline in a
deployment), the *online* key signs ``targets``, ``snapshot`` and ``timestamp``. The one target
is ``keys.json`` (:mod:`slmops.trust.keys`). The registry serves ``metadata/`` and ``targets/``
read-only; it holds none of these keys, so a compromised registry cannot vouch for another
manifest key. ``timestamp.json`` expires after :data:`TIMESTAMP_TTL_S`: whoever holds the
online key re-signs it (`slmops up` does on every start; a deployment runs
`slmops trust timestamp` daily), or gateways stop trusting a repository that may be frozen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from slmops.secretfiles import ensure_ed25519_key
from slmops.trust.keys import KEYS_TARGET, TrustedKeys

ROOT_TTL_S = 365 * 86_400
TARGETS_TTL_S = 90 * 86_400
SNAPSHOT_TTL_S = 30 * 86_400
TIMESTAMP_TTL_S = 7 * 86_400
ONLINE_ROLES = ("targets", "snapshot", "timestamp")


def _expires(ttl_s: int) -> datetime:
    return (datetime.now(UTC) + timedelta(seconds=ttl_s)).replace(microsecond=0)


@dataclass(frozen=True)
class TrustRepository:
    root_dir: Path  # keys/ (private), metadata/ and targets/ (what the registry serves)

    @property
    def keys_dir(self) -> Path:
        return self.root_dir / "keys"

    @property
    def metadata_dir(self) -> Path:
        return self.root_dir / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.root_dir / "targets"

    @property
    def root_file(self) -> Path:
        """The newest root: what an enrolled gateway is given to pin."""
        return self.metadata_dir / "root.json"

    def exists(self) -> bool:
        return self.root_file.exists()

    def init(self, keys: TrustedKeys) -> None:
        """A new repository vouching for ``keys`` (once: an existing one is left as it is)."""
        if self.exists():
            return
        root = Root(expires=_expires(ROOT_TTL_S), consistent_snapshot=False)
        root.add_key(self._signer("root").public_key, "root")
        for role in ONLINE_ROLES:
            root.add_key(self._signer("online").public_key, role)
        self._write_root(Metadata(root), [self._signer("root")])
        self.publish(keys)

    def keys(self) -> TrustedKeys:
        return TrustedKeys.from_bytes((self.targets_dir / KEYS_TARGET).read_bytes())

    def publish(self, keys: TrustedKeys) -> None:
        """Make ``keys`` the vouched-for keys: a new targets, snapshot and timestamp."""
        data = keys.to_bytes()
        targets = self._next("targets", Targets, TARGETS_TTL_S)
        targets.signed.targets[KEYS_TARGET] = TargetFile.from_data(KEYS_TARGET, data)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        (self.targets_dir / KEYS_TARGET).write_bytes(data)
        snapshot = self._next("snapshot", Snapshot, SNAPSHOT_TTL_S)
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        self._write("targets", targets)
        self._write("snapshot", snapshot)
        self.refresh_timestamp()

    def refresh_timestamp(self, ttl_s: int = TIMESTAMP_TTL_S) -> None:
        """Re-sign the timestamp with a new expiry (what proves the repository is not frozen)."""
        timestamp = self._next("timestamp", Timestamp, ttl_s)
        snapshot = Metadata[Snapshot].from_file(str(self.metadata_dir / "snapshot.json"))
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        self._write("timestamp", timestamp)

    def rotate_root_key(self) -> None:
        """A new root key: the next root is signed by the old key and the new one (clients
        follow the chain), and from then on only the new key can sign roots."""
        current = Metadata[Root].from_file(str(self.root_file))
        old_signer = self._signer("root")
        old_path = self.keys_dir / "root.pem"
        old_path.rename(self.keys_dir / f"root.v{current.signed.version}.pem")
        new_signer = self._signer("root")  # created anew
        root = current.signed
        root.revoke_key(old_signer.public_key.keyid, "root")
        root.add_key(new_signer.public_key, "root")
        root.version += 1
        root.expires = _expires(ROOT_TTL_S)
        self._write_root(current, [old_signer, new_signer])

    # --- files and keys ------------------------------------------------------------------

    def _signer(self, name: str) -> CryptoSigner:
        return CryptoSigner(ensure_ed25519_key(self.keys_dir / f"{name}.pem"))

    def _next(
        self, role: str, kind: type[Targets | Snapshot | Timestamp], ttl_s: int
    ) -> Metadata[Any]:
        """The role's next version (the first if there is none), expiring ``ttl_s`` from now."""
        path = self.metadata_dir / f"{role}.json"
        if not path.exists():
            return Metadata(kind(version=1, expires=_expires(ttl_s)))
        metadata: Metadata[Any] = Metadata.from_file(str(path))
        metadata.signed.version += 1
        metadata.signed.expires = _expires(ttl_s)
        return metadata

    def _write(self, role: str, metadata: Metadata[Any]) -> None:
        metadata.signatures.clear()
        metadata.sign(self._signer("online"))
        self._save(self.metadata_dir / f"{role}.json", metadata.to_bytes(JSONSerializer()))

    def _write_root(self, metadata: Metadata[Root], signers: list[CryptoSigner]) -> None:
        metadata.signatures.clear()
        for signer in signers:
            metadata.sign(signer, append=True)
        data = metadata.to_bytes(JSONSerializer())
        self._save(self.metadata_dir / f"{metadata.signed.version}.root.json", data)
        self._save(self.root_file, data)

    @staticmethod
    def _save(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)


def describe(repository: TrustRepository) -> str:
    """One line for the operator: versions and the manifest keys vouched for."""
    root = json.loads(repository.root_file.read_text())["signed"]
    keys = repository.keys()
    listed = ", ".join(
        f"{role}: {' '.join(k.key_id for k in role_keys)}" for role, role_keys in keys.roles.items()
    )
    return f"trust root v{root['version']} (expires {root['expires']}); {listed}"
