"""JetStream KV beyond nats-py's one-key calls: read-modify-write of one JSON document safe
under concurrent writers, listings by subject pattern, and pipelined writes of many keys.

Compare-and-set on the entry's revision: when another writer updated the key in between, the
change is applied again to the newer document. Used for per-version tallies, per-gateway
records and rollout state, which several handlers may touch at once.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Callable, Sequence
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.kv import KeyValue
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)
_ATTEMPTS = 50
_WRONG_LAST_SEQUENCE = 10071  # JetStream's error code: the key's revision was not the expected


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


async def put_many(
    kv: KeyValue, items: Sequence[tuple[str, bytes]], *, create: bool = False,
    timeout_s: float = 30.0,
) -> list[int | Exception]:  # fmt: skip
    """Write every ``(key, value)`` of ``items`` pipelined; per item its new revision or why
    it was not written. ``create``: only keys with no revision yet (a present one comes back
    as ``KeyWrongLastSequenceError``).

    ``kv.put`` is a request per key: an inbox, a future and a timer each, and a fold of 5,000
    reports spent more on that than on the fold. Here every write is one publish; the
    broker's acknowledgements resolve futures on one inbox per connection, under one timeout.
    A write whose ack did not come in time comes back as ``nats.errors.TimeoutError`` (it may
    still have been stored). Not nats-py's ``publish_async``: an error reply (a refused
    create) raises inside its callback and leaves the write's future pending forever."""
    acks = await _Acks.of(kv._js._nc)  # nats-py exposes no public handle on these
    expect = {"Nats-Expected-Last-Subject-Sequence": "0"} if create else None
    futures = [await acks.publish(f"{kv._pre}{key}", value, expect) for key, value in items]
    if futures:
        await asyncio.wait(futures, timeout=timeout_s)
    results: list[int | Exception] = []
    for future in futures:
        if not future.done():
            future.cancel()  # and forgotten by the inbox: a late ack finds nothing
            results.append(nats.errors.TimeoutError())
        elif (error := future.exception()) is not None:
            results.append(error if isinstance(error, Exception) else RuntimeError(repr(error)))
        else:
            results.append(future.result())
    return results


async def put_all(
    kv: KeyValue, items: Sequence[tuple[str, bytes]], timeout_s: float = 30.0
) -> None:
    """``put_many``, raising the first failure (every other write was still attempted)."""
    for result in await put_many(kv, items, timeout_s=timeout_s):
        if isinstance(result, Exception):
            raise result


class _Acks:
    """One reply inbox per connection: JetStream's acknowledgements of pipelined writes."""

    _by_connection: weakref.WeakKeyDictionary[Client, _Acks] = weakref.WeakKeyDictionary()

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox() + "."
        self.pending: dict[str, asyncio.Future[int]] = {}
        self._next = 0
        self._subscribed = False

    @classmethod
    async def of(cls, nc: Client) -> _Acks:
        acks = cls._by_connection.get(nc)
        if acks is None:
            acks = cls._by_connection[nc] = cls(nc)
        if not acks._subscribed:
            acks._subscribed = True
            await nc.subscribe(acks.prefix + "*", cb=acks._on_reply)
        return acks

    async def publish(
        self, subject: str, value: bytes, headers: dict[str, str] | None
    ) -> asyncio.Future[int]:
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _: self.pending.pop(token, None))
        self.pending[token] = future
        await self.nc.publish(subject, value, reply=self.prefix + token,
                              headers=dict(headers) if headers else None)  # fmt: skip
        return future

    async def _on_reply(self, msg: Msg) -> None:
        future = self.pending.get(msg.subject[len(self.prefix) :])
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":  # no stream takes the subject
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            reply = json.loads(msg.data)
            error = reply.get("error")
            if error is None:
                future.set_result(int(reply["seq"]))
            elif error.get("err_code") == _WRONG_LAST_SEQUENCE:
                future.set_exception(nats.js.errors.KeyWrongLastSequenceError(
                    description=error.get("description")))  # fmt: skip
            else:
                future.set_exception(nats.js.errors.APIError(
                    code=error.get("code"), err_code=error.get("err_code"),
                    description=error.get("description")))  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            future.set_exception(RuntimeError(f"unreadable JetStream ack: {exc}"))
