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


async def values_matching(kv: KeyValue, pattern: str) -> list[bytes]:
    """The current values of every key matching a subject ``pattern`` (deleted keys left out)."""
    return list((await entries_matching(kv, pattern)).values())


async def entries_matching(kv: KeyValue, pattern: str) -> dict[str, bytes]:
    """Key -> current value of every key matching a subject ``pattern`` (deleted keys left out).

    Not ``kv.watch``/``kv.keys``: nats-py decides a watch has caught up from the consumer's
    pending count, which already reads 0 while the last value is still on its way to the
    client, so a listing could come back empty under load. A pull consumer's pending count is
    fixed when it is created: exactly that many messages are fetched.
    """
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    # nats-py exposes no public handle on the bucket's stream and subject prefix
    js = kv._js
    subject = f"{kv._pre}{pattern}"
    sub = await js.pull_subscribe(
        subject, stream=kv._stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                              ack_policy=AckPolicy.NONE, inactive_threshold=60.0,
                              mem_storage=True),
    )  # fmt: skip
    try:
        pending = (await sub.consumer_info()).num_pending or 0
        entries: dict[str, bytes] = {}
        seen = 0
        while seen < pending:
            for msg in await sub.fetch(min(pending - seen, 256), timeout=5.0):
                seen += 1
                operation = (msg.headers or {}).get("KV-Operation")
                if operation not in ("DEL", "PURGE"):
                    entries[msg.subject.removeprefix(kv._pre)] = msg.data
        return entries
    finally:
        await sub.unsubscribe()
