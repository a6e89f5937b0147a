"""``keys.json``: the public keys of each signing role, with the time each stops being trusted.

Rotating a role's key is adding the new key and giving the old one a ``not_after``: signatures by
the old key are accepted until then (gateways keep working while the registry moves to the new
key), and refused afterwards.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from slmops.signatures import key_id_of, load_public_key

KEYS_TARGET = "keys.json"


class KeyRole(StrEnum):
    MANIFESTS = "manifests"  # the registry: variant, version and report manifests, rollbacks
    ASSIGNMENTS = "assignments"  # the rollout service: what each gateway is to run


class UntrustedKeyError(Exception):
    """A signature by a key the trust root does not vouch for (now)."""


@functools.lru_cache(maxsize=64)  # the same few keys, parsed by every agent of a fleet
def _key_id(public_key_pem: str) -> str:
    return key_id_of(load_public_key(public_key_pem))


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    public_key_pem: str
    not_after: int | None = None  # unix seconds; None: until rotated

    def as_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "public_key_pem": self.public_key_pem,
                "not_after": self.not_after}  # fmt: skip

    @classmethod
    def of(cls, public_key_pem: str, not_after: int | None = None) -> TrustedKey:
        return cls(_key_id(public_key_pem), public_key_pem, not_after)


@dataclass(frozen=True)
class TrustedKeys:
    """What ``keys.json`` says, parsed: the keys of each role."""

    roles: dict[KeyRole, tuple[TrustedKey, ...]]

    @classmethod
    def single(cls, role: KeyRole, public_key_pem: str) -> TrustedKeys:
        """One key for one role (what a first use, a test or a benchmark trusts)."""
        return cls({role: (TrustedKey.of(public_key_pem),)})

    def key(self, role: KeyRole, key_id: str, now: float | None = None) -> str:
        """The PEM of ``role``'s key ``key_id``, if trusted at ``now``; else
        :class:`UntrustedKeyError` saying why."""
        for key in self.roles.get(role, ()):
            if key.key_id != key_id:
                continue
            if key.not_after is not None and (now or time.time()) > key.not_after:
                raise UntrustedKeyError(
                    f"{role} key {key_id} was rotated out at {key.not_after}: its signatures "
                    "are no longer accepted"
                )
            return key.public_key_pem
        raise UntrustedKeyError(f"{role} key {key_id} is not in the trust root's keys.json")

    def valid(self, role: KeyRole, now: float | None = None) -> tuple[str, ...]:
        """The PEMs of ``role``'s keys trusted at ``now``."""
        at = now or time.time()
        return tuple(k.public_key_pem for k in self.roles.get(role, ())
                     if k.not_after is None or at <= k.not_after)  # fmt: skip

    def current(self, role: KeyRole) -> TrustedKey:
        """The key of ``role`` without an end: the one its signer uses now."""
        for key in self.roles.get(role, ()):
            if key.not_after is None:
                return key
        raise UntrustedKeyError(f"no current {role} key in keys.json")

    def rotated(self, role: KeyRole, new_key_pem: str, old_until: int) -> TrustedKeys:
        """These keys with ``new_key_pem`` current for ``role`` and its other keys ending at
        ``old_until`` at the latest."""
        new = TrustedKey.of(new_key_pem)
        kept = tuple(
            TrustedKey(k.key_id, k.public_key_pem, min(k.not_after or old_until, old_until))
            for k in self.roles.get(role, ())
            if k.key_id != new.key_id
        )
        return TrustedKeys({**self.roles, role: (*kept, new)})

    def to_bytes(self) -> bytes:
        body = {role.value: [k.as_dict() for k in keys] for role, keys in self.roles.items()}
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrustedKeys:
        body = json.loads(data)
        roles = {}
        for role in KeyRole:
            entries = body.get(role.value, [])
            roles[role] = tuple(
                TrustedKey(str(e["key_id"]), str(e["public_key_pem"]), e.get("not_after"))
                for e in entries
            )
        return cls(roles)
