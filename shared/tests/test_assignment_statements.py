"""Signed assignment statements: what the rollout service signs, a gateway accepts only as
signed, for itself, by a trusted key, before it expires."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.assignments import AssignmentSigner, StatementRefused, check_statement
from slmops.events.payloads import ArtifactRef, DesiredModel, GatewayAssignment
from slmops.trust import KeyRole, TrustedKey, TrustedKeys

DIGEST = "sha256:" + "a" * 64


def _assignment(**fields: object) -> GatewayAssignment:
    desired = DesiredModel(
        model_name="minilm", version="1.1.0", variant_id="v-1", manifest_digest=DIGEST,
        artifact=ArtifactRef(digest="sha256:" + "b" * 64, size_bytes=10, uri="s3://b/blobs/x"),
    )  # fmt: skip
    return GatewayAssignment(gateway_id="gw-1", generation=7, rollout_id="r-1", desired=desired,
                             **fields)  # type: ignore[arg-type]  # fmt: skip


def _trusting(signer: AssignmentSigner, not_after: int | None = None) -> TrustedKeys:
    pem = (
        signer.private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return TrustedKeys({KeyRole.ASSIGNMENTS: (TrustedKey.of(pem, not_after),)})


@pytest.fixture
def signer() -> AssignmentSigner:
    return AssignmentSigner(Ed25519PrivateKey.generate(), ttl_s=3600)


def test_a_signed_statement_for_this_gateway_is_accepted(signer: AssignmentSigner) -> None:
    signed = signer.sign(_assignment())
    check_statement(signed, _trusting(signer), "gw-1")
    assert signed.statement_key_id == signer.key_id


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"generation": 8}, "does not verify"),
        ({"rollback": True}, "does not verify"),
        ({"overlay": {"intra_op_threads": 4}}, "does not verify"),
        ({"rollout_id": "r-2"}, "does not verify"),
        ({"statement_expires_at": int(time.time()) + 10 * 86_400}, "does not verify"),
    ],
)
def test_any_altered_field_breaks_the_statement(
    signer: AssignmentSigner, change: dict[str, object], reason: str
) -> None:
    altered = signer.sign(_assignment()).model_copy(update=change)
    with pytest.raises(StatementRefused, match=reason):
        check_statement(altered, _trusting(signer), "gw-1")


def test_another_models_or_versions_bytes_break_it(signer: AssignmentSigner) -> None:
    signed = signer.sign(_assignment())
    other_digest = "sha256:" + "c" * 64
    for change in ({"version": "99"}, {"model_name": "other"}, {"manifest_digest": other_digest}):
        desired = signed.desired.model_copy(update=change)
        with pytest.raises(StatementRefused, match="does not verify"):
            check_statement(signed.model_copy(update={"desired": desired}), _trusting(signer),
                            "gw-1")  # fmt: skip


def test_unsigned_foreign_untrusted_and_expired_statements_are_refused(
    signer: AssignmentSigner,
) -> None:
    keys = _trusting(signer)
    with pytest.raises(StatementRefused, match="without a signed statement"):
        check_statement(_assignment(), keys, "gw-1")
    with pytest.raises(StatementRefused, match="for gateway gw-1, not this one"):
        check_statement(signer.sign(_assignment()), keys, "gw-2")
    rogue = AssignmentSigner(Ed25519PrivateKey.generate())
    with pytest.raises(StatementRefused, match="untrusted key"):
        check_statement(rogue.sign(_assignment()), keys, "gw-1")
    old = signer.sign(_assignment(), now=time.time() - 7200)  # expired an hour ago
    with pytest.raises(StatementRefused, match="expired"):
        check_statement(old, keys, "gw-1")
    rotated_out = _trusting(signer, not_after=int(time.time()) - 1)
    with pytest.raises(StatementRefused, match="rotated out"):
        check_statement(signer.sign(_assignment()), rotated_out, "gw-1")
