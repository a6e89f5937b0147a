"""The trust root: which keys a gateway believes, pinned, expiring and rotatable (TUF).

A gateway used to take the registry's public key from ``GET /v1/keys`` the first time it asked:
whoever answered first was believed. Now it is given a TUF root (``root.json``) when it is
enrolled and believes only what that root vouches for. The repository (:mod:`.repository`, on
the trusted host that holds the keys) publishes one target, ``keys.json``, the keys by role
(:mod:`.keys`: which keys sign manifests, until when); the gateway's client (:mod:`.client`,
python-tuf's ``ngclient``) fetches it through the registry with TUF's checks: signatures by the
roles' keys and thresholds, expiry of every role (a frozen or replayed repository is detected
once its timestamp expires), versions that only move forward (no rollback), and root rotation
(each new root signed by the old root's keys and its own).

Why python-tuf and this shape: TUF is the field's answer to exactly these attacks and ngclient
implements its client workflow; putting the *keys* (not every artifact) in TUF keeps the
manifests and their signatures as they are, so the verification path a gateway runs per install
does not change, only where its keys come from.
"""

from slmops.trust.keys import KeyRole, TrustedKey, TrustedKeys, UntrustedKeyError

__all__ = ["KeyRole", "TrustedKey", "TrustedKeys", "UntrustedKeyError"]
