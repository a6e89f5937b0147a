"""Signed rollbacks: the one way a gateway accepts a lower version than it runs.

The registry signs a rollback statement - this model, back to this variant manifest (which
fixes the device class), for this rollout, until this time - with the key that signs manifests;
the rollout service puts the signature and its expiry in the assignments; a gateway rebuilds the
statement from its assignment and checks the signature with the registry's public key and the
expiry with its clock. Nothing else (a forged assignment, or one replayed from the stream after
its statement expired) can downgrade it.
"""

from __future__ import annotations

import json
import time

from slmops.signatures import PublicKeyLike, verify


def rollback_statement(
    model_name: str, manifest_digest: str, rollout_id: str | None, expires_at: int
) -> bytes:
    """The signed bytes: canonical JSON of what the rollback allows, until ``expires_at``
    (unix seconds)."""
    statement = {
        "kind": "rollback",
        "model_name": model_name,
        "manifest_digest": manifest_digest,
        "rollout_id": rollout_id or "",
        "expires_at": expires_at,
    }
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


class RollbackRefused(Exception):
    """Why a rollback assignment does not prove itself."""


def check_rollback(
    model_name: str,
    manifest_digest: str,
    rollout_id: str | None,
    signature: str | None,
    expires_at: int | None,
    public_key: PublicKeyLike,
    now: float | None = None,
) -> None:
    """Raise :class:`RollbackRefused` unless the statement is signed and not expired."""
    if not signature or expires_at is None:
        raise RollbackRefused("a rollback assignment without a signed, expiring statement")
    statement = rollback_statement(model_name, manifest_digest, rollout_id, expires_at)
    if not verify(public_key, statement, signature):
        raise RollbackRefused("a rollback assignment without a valid registry signature")
    if (now if now is not None else time.time()) > expires_at:
        raise RollbackRefused(
            f"a rollback statement that expired at {expires_at} (replayed, or delivered too "
            "late: ask the rollout service for a new one)"
        )
