"""Signed rollbacks: the one way a gateway accepts a lower version than it runs.

The registry signs a rollback statement - this model, back to this variant manifest, for this
rollout - with the key that signs manifests; the rollout service puts the signature in the
assignments; a gateway rebuilds the statement from its assignment and checks the signature with
the registry's public key. Nothing else (a replayed or forged assignment) can downgrade it.
"""

from __future__ import annotations

import json

from slmops.signatures import PublicKeyLike, verify


def rollback_statement(model_name: str, manifest_digest: str, rollout_id: str | None) -> bytes:
    """The signed bytes: canonical JSON of what the rollback allows."""
    statement = {
        "kind": "rollback",
        "model_name": model_name,
        "manifest_digest": manifest_digest,
        "rollout_id": rollout_id or "",
    }
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


def rollback_is_signed(
    model_name: str,
    manifest_digest: str,
    rollout_id: str | None,
    signature: str | None,
    public_key: PublicKeyLike,
) -> bool:
    if not signature:
        return False
    return verify(
        public_key, rollback_statement(model_name, manifest_digest, rollout_id), signature
    )
