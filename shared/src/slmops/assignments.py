"""Signed assignment statements: what a gateway acts on, proven end to end.

The rollout service signs, with a key of its own (the trust root's ``assignments`` role, not
the registry's manifest key), a statement naming the gateway, the generation, the rollout,
whether it is a rollback, the model, version, variant, manifest and artifact digests, the
overlay and an expiry. The gateway rebuilds the statement from the assignment it read (from its
desired state or its notification) and checks the signature with a key its pinned trust root
vouches for, that it names this gateway, and that it has not expired; its generation must be
newer than the last one it acted on (kept on disk), so a replayed older statement is ignored.
Together with the signed manifest (same model, a version not older) nothing unsigned decides
what a gateway installs.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cohorts import CohortState, cohort_statement
from slmops.events.payloads import GatewayAssignment
from slmops.signatures import key_id_of, verify
from slmops.trust.keys import KeyRole, TrustedKeys, UntrustedKeyError

#: How long a statement holds unless the signer says otherwise: a gateway offline for longer
#: finds an expired desired state and waits for the rollout service to sign it again.
DEFAULT_STATEMENT_TTL_S = 30 * 86_400


def assignment_statement(assignment: GatewayAssignment, expires_at: int) -> bytes:
    """The signed bytes: canonical JSON of everything the assignment decides."""
    desired = assignment.desired
    statement = {
        "kind": "assignment",
        "gateway_id": assignment.gateway_id,
        "generation": assignment.generation,
        "rollout_id": assignment.rollout_id or "",
        "rollback": assignment.rollback,
        "model_name": desired.model_name,
        "version": desired.version,
        "variant_id": desired.variant_id,
        "manifest_digest": desired.manifest_digest,
        "artifact_digest": desired.artifact.digest,
        "overlay": assignment.overlay,
        "expires_at": expires_at,
    }
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


class StatementRefused(Exception):
    """Why an assignment does not prove itself."""


@dataclass(frozen=True)
class AssignmentSigner:
    """The rollout service's statement key (Ed25519, from a PKCS8 PEM file)."""

    private_key: Ed25519PrivateKey
    ttl_s: float = DEFAULT_STATEMENT_TTL_S

    @classmethod
    def from_file(cls, path: Path, ttl_s: float = DEFAULT_STATEMENT_TTL_S) -> AssignmentSigner:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds no Ed25519 private key")
        return cls(key, ttl_s)

    @property
    def key_id(self) -> str:
        return key_id_of(self.private_key.public_key())

    def sign(self, assignment: GatewayAssignment, now: float | None = None) -> GatewayAssignment:
        """``assignment`` with its statement signed, expiring ``ttl_s`` from ``now``."""
        expires_at = int((now if now is not None else time.time()) + self.ttl_s)
        signature = self.private_key.sign(assignment_statement(assignment, expires_at))
        return assignment.model_copy(update={
            "statement_signature": base64.b64encode(signature).decode(),
            "statement_key_id": self.key_id, "statement_expires_at": expires_at,
        })  # fmt: skip

    def sign_cohort(self, state: CohortState, now: float | None = None) -> CohortState:
        """``state`` with its cohort statement signed, expiring ``ttl_s`` from ``now``."""
        expires_at = int((now if now is not None else time.time()) + self.ttl_s)
        signature = self.private_key.sign(cohort_statement(state, expires_at))
        return state.model_copy(update={
            "statement_signature": base64.b64encode(signature).decode(),
            "statement_key_id": self.key_id, "statement_expires_at": expires_at,
        })  # fmt: skip


def check_statement(
    assignment: GatewayAssignment, keys: TrustedKeys, gateway_id: str, now: float | None = None
) -> None:
    """Raise :class:`StatementRefused` unless ``assignment`` carries a statement signed by a
    trusted assignments key, for ``gateway_id``, not expired."""
    expires_at = assignment.statement_expires_at
    if not assignment.statement_signature or not assignment.statement_key_id or not expires_at:
        raise StatementRefused("an assignment without a signed statement")
    if assignment.gateway_id != gateway_id:
        raise StatementRefused(f"a statement for gateway {assignment.gateway_id}, not this one")
    _check_signed(
        assignment_statement(assignment, expires_at), assignment.statement_signature,
        assignment.statement_key_id, expires_at, keys, now, what="assignment",
        altered="model, version, digests, generation or gateway",
    )  # fmt: skip


def check_cohort_statement(
    state: CohortState, keys: TrustedKeys, cohort: int, now: float | None = None
) -> None:
    """Raise :class:`StatementRefused` unless ``state`` is signed by a trusted assignments key,
    for ``cohort`` (the gateway's own), not expired."""
    expires_at = state.statement_expires_at
    if not state.statement_signature or not state.statement_key_id or not expires_at:
        raise StatementRefused("a cohort state without a signed statement")
    if state.cohort != cohort:
        raise StatementRefused(f"a statement for cohort {state.cohort}, not this gateway's "
                               f"{cohort}")  # fmt: skip
    _check_signed(
        cohort_statement(state, expires_at), state.statement_signature, state.statement_key_id,
        expires_at, keys, now, what="cohort state",
        altered="entries, models, digests, selectors, overlays or generation",
    )  # fmt: skip


def _check_signed(
    statement: bytes, signature: str, key_id: str, expires_at: int, keys: TrustedKeys,
    now: float | None, *, what: str, altered: str,
) -> None:  # fmt: skip
    try:
        public_key = keys.key(KeyRole.ASSIGNMENTS, key_id, now)
    except UntrustedKeyError as exc:
        raise StatementRefused(f"an {what} signed by an untrusted key: {exc}") from None
    if not verify(public_key, statement, signature):
        raise StatementRefused(
            f"an {what} whose statement does not verify (forged or altered: {altered})"
        )
    if (now if now is not None else time.time()) > expires_at:
        raise StatementRefused(
            f"an {what} whose statement expired at {expires_at} (replayed, or kept too "
            "long: the rollout service signs it again)"
        )
