"""The trust root end to end: a TUF repository written with python-tuf, served over real HTTP,
read by ngclient from a pinned root. Rotation works, and every substitution is refused."""

from __future__ import annotations

import functools
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.trust import KeyRole, TrustedKey, TrustedKeys, UntrustedKeyError
from slmops.trust.client import TRUST_PATH, TrustClient, TrustError
from slmops.trust.repository import TrustRepository


def _pem() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.fixture
def repository(tmp_path: Path) -> TrustRepository:
    repo = TrustRepository(tmp_path / "repo")
    repo.init(TrustedKeys({KeyRole.MANIFESTS: (TrustedKey.of(_pem()),)}))
    return repo


@pytest.fixture
def served(repository: TrustRepository) -> Iterator[str]:
    """The repository over HTTP, laid out as the registry serves it (``/v1/trust/...``)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def translate_path(self, path: str) -> str:
            relative = path.split("?")[0].removeprefix(TRUST_PATH + "/")
            return str(repository.root_dir / relative)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _client(
    repository: TrustRepository, url: str, cache: Path, pinned: Path | None = None
) -> TrustClient:
    if pinned is None:
        pinned = cache.parent / "pinned-root.json"
        pinned.write_bytes(repository.root_file.read_bytes())
    return TrustClient(pinned, cache, url, refresh_interval_s=0)


def test_a_pinned_root_yields_the_vouched_keys(
    repository: TrustRepository, served: str, tmp_path: Path
) -> None:
    keys = _client(repository, served, tmp_path / "gw").refresh()
    assert keys == repository.keys()
    current = keys.current(KeyRole.MANIFESTS)
    assert keys.key(KeyRole.MANIFESTS, current.key_id) == current.public_key_pem


def test_a_rotated_manifest_key_is_accepted_until_its_end_then_refused(
    repository: TrustRepository, served: str, tmp_path: Path
) -> None:
    client = _client(repository, served, tmp_path / "gw")
    old = client.refresh().current(KeyRole.MANIFESTS)
    new_pem, until = _pem(), int(time.time()) + 3600
    repository.publish(repository.keys().rotated(KeyRole.MANIFESTS, new_pem, until))
    keys = client.refresh()
    new = keys.current(KeyRole.MANIFESTS)
    assert new.public_key_pem == new_pem
    assert keys.key(KeyRole.MANIFESTS, old.key_id) == old.public_key_pem  # still, until `until`
    with pytest.raises(UntrustedKeyError, match="rotated out"):
        keys.key(KeyRole.MANIFESTS, old.key_id, now=until + 1)
    assert keys.key(KeyRole.MANIFESTS, new.key_id, now=until + 1) == new_pem


def test_a_rotated_root_is_followed_and_the_old_root_key_signs_nothing_more(
    repository: TrustRepository, served: str, tmp_path: Path
) -> None:
    client = _client(repository, served, tmp_path / "gw")
    client.refresh()
    repository.rotate_root_key()
    repository.publish(repository.keys().rotated(KeyRole.MANIFESTS, _pem(), int(time.time())))
    assert client.refresh() == repository.keys()
    cached = json.loads((tmp_path / "gw" / "metadata" / "root.json").read_text())
    assert cached["signed"]["version"] == 2
    # A fresh gateway pinned to the first root follows the chain too.
    first = tmp_path / "first-root.json"
    first.write_bytes((repository.metadata_dir / "1.root.json").read_bytes())
    assert _client(repository, served, tmp_path / "gw2", first).refresh() == repository.keys()


def test_a_substituted_keys_file_is_refused(
    repository: TrustRepository, served: str, tmp_path: Path
) -> None:
    forged = TrustedKeys({KeyRole.MANIFESTS: (TrustedKey.of(_pem()),)})
    (repository.targets_dir / "keys.json").write_bytes(forged.to_bytes())
    with pytest.raises(TrustError, match="does not verify"):
        _client(repository, served, tmp_path / "gw").refresh()


def test_a_substituted_repository_is_refused_by_the_pinned_root(
    repository: TrustRepository, served: str, tmp_path: Path
) -> None:
    pinned = tmp_path / "pinned.json"
    pinned.write_bytes(repository.root_file.read_bytes())
    # An attacker's own repository (new keys, same file names) replaces the real one.
    impostor = TrustRepository(tmp_path / "impostor")
    impostor.init(TrustedKeys({KeyRole.MANIFESTS: (TrustedKey.of(_pem()),)}))
    for sub in ("metadata", "targets"):
        for path in (impostor.root_dir / sub).iterdir():
            (repository.root_dir / sub / path.name).write_bytes(path.read_bytes())
    with pytest.raises(TrustError, match="does not verify"):
        _client(repository, served, tmp_path / "gw", pinned).refresh()


def test_an_expired_timestamp_is_refused_as_a_frozen_repository(
    repository: TrustRepository, served: str, tmp_path: Path
) -> None:
    repository.refresh_timestamp(ttl_s=-60)
    with pytest.raises(TrustError, match="Expired"):
        _client(repository, served, tmp_path / "gw").refresh()


def test_replaying_older_metadata_is_refused(
    repository: TrustRepository, served: str, tmp_path: Path
) -> None:
    old_timestamp = (repository.metadata_dir / "timestamp.json").read_bytes()
    client = _client(repository, served, tmp_path / "gw")
    repository.refresh_timestamp()
    client.refresh()  # has seen the newer timestamp
    (repository.metadata_dir / "timestamp.json").write_bytes(old_timestamp)
    with pytest.raises(TrustError, match="does not verify"):
        client.refresh()
