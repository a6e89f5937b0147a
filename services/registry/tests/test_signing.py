"""Registry signing key: sign/verify, JWK, and where the key comes from."""

from __future__ import annotations

import base64
import hashlib
import logging
import stat
import threading
from pathlib import Path
from typing import Any, Literal

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.settings import PlatformSettings
from slmops_registry import signing
from slmops_registry.settings import RegistrySettings
from slmops_registry.signing import RegistrySigner, SigningKeyError, load_signer, verify

LOCAL_KEY = Path("registry") / "signing-key.pem"
Env = Literal["local", "dev", "staging", "prod"]


def make_settings(tmp_path: Path, env: Env = "local", **fields: Any) -> RegistrySettings:
    # Explicit None beats whatever SLMOPS_REGISTRY_SIGNING_KEY* the developer's shell has.
    fields.setdefault("signing_key", None)
    fields.setdefault("signing_key_file", None)
    platform = PlatformSettings(var_dir=tmp_path, env=env, s3_secret_access_key="a-real-secret")
    return RegistrySettings(platform=platform, **fields)


def private_pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def test_sign_verify_round_trip_with_pem_and_raw_key() -> None:
    signer = RegistrySigner(Ed25519PrivateKey.generate())

    signature = signer.sign(b"manifest bytes")

    assert len(base64.b64decode(signature, validate=True)) == 64
    assert verify(signer.public_key_pem(), b"manifest bytes", signature) is True
    assert verify(signer.public_key_raw(), b"manifest bytes", signature) is True


def test_verify_rejects_tampered_data_signature_and_wrong_key() -> None:
    signer = RegistrySigner(Ed25519PrivateKey.generate())
    other = RegistrySigner(Ed25519PrivateKey.generate())
    signature = signer.sign(b"payload")
    raw = bytearray(base64.b64decode(signature))
    raw[0] ^= 0x01
    flipped = base64.b64encode(bytes(raw)).decode()

    assert verify(signer.public_key_pem(), b"payload!", signature) is False
    assert verify(signer.public_key_pem(), b"payload", flipped) is False
    assert verify(other.public_key_pem(), b"payload", signature) is False


@pytest.mark.parametrize("signature", ["", "not base64!!", "AAAA", "x" * 200])
def test_verify_returns_false_on_garbage_signature(signature: str) -> None:
    signer = RegistrySigner(Ed25519PrivateKey.generate())

    assert verify(signer.public_key_pem(), b"payload", signature) is False


def test_verify_raises_on_unusable_public_key() -> None:
    with pytest.raises(SigningKeyError, match="not an Ed25519 public key"):
        verify("not a key", b"payload", "AAAA")


def test_key_id_and_jwk_describe_the_public_key() -> None:
    signer = RegistrySigner(Ed25519PrivateKey.generate())
    raw = signer.public_key_raw()

    jwk = signer.public_jwk()

    assert signer.key_id == hashlib.sha256(raw).hexdigest()[:16]
    assert jwk["kty"] == "OKP"
    assert jwk["crv"] == "Ed25519"
    assert jwk["kid"] == signer.key_id
    assert "=" not in jwk["x"]
    assert "d" not in jwk  # the private part must never be exported
    x = jwk["x"]
    assert base64.urlsafe_b64decode(x + "=" * (-len(x) % 4)) == raw
    assert len(raw) == 32


def test_local_key_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)

    first = load_signer(settings)
    second = load_signer(settings)

    path = tmp_path / LOCAL_KEY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.key_id == second.key_id
    assert RegistrySigner.from_pem(path.read_bytes()).key_id == first.key_id
    assert [p.name for p in path.parent.iterdir()] == ["signing-key.pem"]  # no temp files left


def test_concurrent_first_loads_end_with_one_key(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    barrier = threading.Barrier(8)
    key_ids: list[str] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            key_ids.append(load_signer(settings).key_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert errors == []
    assert len(key_ids) == 8
    assert set(key_ids) == {load_signer(settings).key_id}


def test_loser_of_the_creation_race_uses_the_winners_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process publishes its key between our existence check and our own publish.
    path = tmp_path / LOCAL_KEY
    winner = Ed25519PrivateKey.generate()

    def generate_while_other_process_wins() -> Ed25519PrivateKey:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(private_pem(winner))
        return Ed25519PrivateKey.generate()

    monkeypatch.setattr(signing, "_new_private_key", generate_while_other_process_wins)

    signer = load_signer(make_settings(tmp_path))

    assert signer.key_id == RegistrySigner(winner).key_id
    assert RegistrySigner.from_pem(path.read_bytes()).key_id == signer.key_id


def test_generated_key_is_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    signer = load_signer(make_settings(tmp_path))

    pem = (tmp_path / LOCAL_KEY).read_text()
    body = "".join(pem.strip().splitlines()[1:-1])
    assert signer.key_id in caplog.text
    assert body not in caplog.text
    assert body not in repr(signer)


@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_no_key_outside_local_fails_fast(tmp_path: Path, env: Env) -> None:
    settings = make_settings(tmp_path, env=env)

    with pytest.raises(SigningKeyError) as info:
        load_signer(settings)

    assert "SLMOPS_REGISTRY_SIGNING_KEY " in str(info.value)
    assert "SLMOPS_REGISTRY_SIGNING_KEY_FILE" in str(info.value)
    assert not (tmp_path / LOCAL_KEY).exists()


def test_key_from_env_pem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = Ed25519PrivateKey.generate()
    monkeypatch.setenv("SLMOPS_REGISTRY_SIGNING_KEY", private_pem(key))
    monkeypatch.delenv("SLMOPS_REGISTRY_SIGNING_KEY_FILE", raising=False)
    platform = PlatformSettings(var_dir=tmp_path, env="prod", s3_secret_access_key="a-real-secret")

    signer = load_signer(RegistrySettings(platform=platform))

    assert signer.key_id == RegistrySigner(key).key_id
    assert not (tmp_path / LOCAL_KEY).exists()


def test_key_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "mounted" / "key.pem"
    key_file.parent.mkdir()
    key_file.write_text(private_pem(key))
    monkeypatch.delenv("SLMOPS_REGISTRY_SIGNING_KEY", raising=False)
    monkeypatch.setenv("SLMOPS_REGISTRY_SIGNING_KEY_FILE", str(key_file))
    platform = PlatformSettings(var_dir=tmp_path, env="prod", s3_secret_access_key="a-real-secret")

    signer = load_signer(RegistrySettings(platform=platform))

    assert signer.key_id == RegistrySigner(key).key_id


def test_env_key_wins_over_file(tmp_path: Path) -> None:
    env_key, file_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    key_file = tmp_path / "key.pem"
    key_file.write_text(private_pem(file_key))

    signer = load_signer(
        make_settings(tmp_path, signing_key=private_pem(env_key), signing_key_file=key_file)
    )

    assert signer.key_id == RegistrySigner(env_key).key_id


def test_missing_key_file_is_an_error_even_locally(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"

    with pytest.raises(SigningKeyError, match="does not exist") as info:
        load_signer(make_settings(tmp_path, signing_key_file=missing))

    assert str(missing) in str(info.value)
    assert not (tmp_path / LOCAL_KEY).exists()  # no silent fallback to a generated key


def test_invalid_key_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    secret_text = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LW1hdGVyaWFs\n-----END PRIVATE KEY-----\n"

    with pytest.raises(SigningKeyError, match="SLMOPS_REGISTRY_SIGNING_KEY") as info:
        load_signer(make_settings(tmp_path, signing_key=secret_text))

    assert "c2VjcmV0LW1hdGVyaWFs" not in str(info.value)


def test_non_ed25519_key_is_rejected(tmp_path: Path) -> None:
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )

    with pytest.raises(SigningKeyError, match="expected an Ed25519 key"):
        load_signer(make_settings(tmp_path, signing_key=ec_pem))
