"""The releases the rollout service has heard of, kept in KV (``slmops-rollouts``).

``release.created`` is kept under ``release.<id>``, with the trace it came in under
``release-trace.<id>`` (a rollout asked for later joins the model's journey); ``release.failed``
under ``release-failed.<id>``. So a rollout of a version whose every candidate failed is
refused with the reason per class, not with "no release yet" as if one were still coming.
"""

from __future__ import annotations

import nats.js.errors
from nats.js.kv import KeyValue

from slmops.events import ReleaseCreated, ReleaseFailed, release_id_for
from slmops_rollout.targets import NoVariant


class UnknownRelease(LookupError):
    """Neither a release nor a failed one of this version (yet)."""


async def remember(
    kv: KeyValue, release: ReleaseCreated | ReleaseFailed, traceparent: str | None = None
) -> None:
    if isinstance(release, ReleaseFailed):
        await kv.put(f"release-failed.{release.release_id}", release.model_dump_json().encode())
        return
    await kv.put(f"release.{release.release_id}", release.model_dump_json().encode())
    if traceparent is not None:
        await kv.put(f"release-trace.{release.release_id}", traceparent.encode())


async def find(kv: KeyValue, model_name: str, version: str) -> tuple[ReleaseCreated, str | None]:
    """The version's release and its trace; ``NoVariant`` with the reasons per class when its
    release failed, ``UnknownRelease`` when nothing was decided (yet)."""
    release_id = release_id_for(model_name, version)
    try:
        entry = await kv.get(f"release.{release_id}")
    except nats.js.errors.KeyNotFoundError:
        raise await _why_none(kv, model_name, version, release_id) from None
    release = ReleaseCreated.model_validate_json(entry.value or b"{}")
    try:
        traceparent = (await kv.get(f"release-trace.{release_id}")).value
    except nats.js.errors.KeyNotFoundError:
        traceparent = None
    return release, traceparent.decode() if traceparent else None


async def _why_none(
    kv: KeyValue, model_name: str, version: str, release_id: str
) -> NoVariant | UnknownRelease:
    try:
        entry = await kv.get(f"release-failed.{release_id}")
    except nats.js.errors.KeyNotFoundError:
        return UnknownRelease(
            f"no release of {model_name} {version} yet: the validator creates it once every "
            "candidate is judged"
        )
    failed = ReleaseFailed.model_validate_json(entry.value or b"{}")
    return NoVariant(model_name, version, {e.device_class: e.reason for e in failed.entries})


async def by_id(kv: KeyValue, release_id: str) -> tuple[ReleaseCreated | None, str | None]:
    """A release remembered under its own id (a proposal is found this way: its version
    already has a release), with its trace; (None, None) when unknown."""
    try:
        entry = await kv.get(f"release.{release_id}")
    except nats.js.errors.KeyNotFoundError:
        return None, None
    try:
        traceparent = (await kv.get(f"release-trace.{release_id}")).value
    except nats.js.errors.KeyNotFoundError:
        traceparent = None
    release = ReleaseCreated.model_validate_json(entry.value or b"{}")
    return release, traceparent.decode() if traceparent else None
