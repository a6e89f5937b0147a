"""Read-modify-write of one JSON document in JetStream KV, safe under concurrent writers.

Compare-and-set on the entry's revision: when another writer updated the key in between, the
change is applied again to the newer document. Used for per-version tallies, per-gateway
records and rollout state, which several handlers may touch at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)
_ATTEMPTS = 50


async def update_model(
    kv: KeyValue,
    key: str,
    model: type[M],
    change: Callable[[M], None],
    default: Callable[[], M],
) -> M:
    """Apply ``change`` to the document at ``key`` (``default()`` when there is none)."""
    for _ in range(_ATTEMPTS):
        try:
            entry = await kv.get(key)
            current = model.model_validate_json(entry.value or b"{}")
            revision: int | None = entry.revision
        except nats.js.errors.KeyNotFoundError:
            current, revision = default(), None
        change(current)
        payload = current.model_dump_json().encode()
        try:
            if revision is None:
                await kv.create(key, payload)
            else:
                await kv.update(key, payload, last=revision)
            return current
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
            continue  # another writer won: read its version and apply the change again
    raise RuntimeError(f"could not update {key} in {_ATTEMPTS} attempts: too many writers")
