"""registry event handlers: plain async functions, event in, events out.

Every optimization, validation, release, rollout and field event is folded into the lineage
index (see :mod:`slmops_registry.projection`); gateway reports are folded in batches by a
consumer of their own (:mod:`slmops_registry.reports`).

A ``model.published`` event that carries no manifest is a request from an upstream system to
record a model whose artifact it put in the store itself: the registry verifies the object
(it must exist, hash to its digest and have the announced size; an encoder must say which
output holds its embeddings), then records and signs it and emits its own ``model.published``
with the manifest - the fact downstream services act on. If the object is missing or wrong, it
emits ``model.rejected`` with the reason instead of failing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from slmops.bus import Handlers
from slmops.events import (
    CloudEvent,
    GatewayReport,
    ModelPublished,
    ModelRejected,
    TransientError,
    new_event,
)
from slmops.events.envelope import derive_event_id
from slmops_registry.errors import RegistryError
from slmops_registry.projection import PROJECTED, LineageStore, project
from slmops_registry.publishing import SOURCE, Publisher, PublishRequest

GetPublisher = Callable[[], Awaitable[Publisher | None]]
GetLineage = Callable[[], Awaitable[LineageStore | None]]


async def on_lineage_event(event: CloudEvent[Any], *, get_lineage: GetLineage) -> None:
    """Fold an optimization, validation, release, rollout or field event into the lineage."""
    store = await get_lineage()
    if store is None:
        raise TransientError("registry not connected yet")
    await project(store, event)


async def on_model_published(
    event: CloudEvent[ModelPublished], *, get_publisher: GetPublisher, get_lineage: GetLineage
) -> list[CloudEvent[Any]]:
    data = event.data
    if event.source == SOURCE or data.manifest_digest is not None:
        # recorded already (by us, or by whoever signed that manifest): lineage only
        await on_lineage_event(event, get_lineage=get_lineage)
        return []
    publisher = await get_publisher()
    if publisher is None:
        raise TransientError("registry not connected yet")
    try:
        blob = await publisher.existing_blob(data.artifact.digest, "artifact")
        if blob.size_bytes != data.artifact.size_bytes:
            raise RegistryError(
                422,
                f"artifact {blob.digest} has {blob.size_bytes} bytes, "
                f"the event says {data.artifact.size_bytes}",
            )
        request = PublishRequest(
            model_name=data.model_name,
            version=data.version,
            format=data.format,
            task=data.task,
            artifact_digest=data.artifact.digest,
            labels=data.labels,
            device_classes=data.device_classes,
            eval_set_digest=data.eval_set.digest if data.eval_set else None,
            embedding_output=data.embedding_output or None,  # "" from a producer: no hint
            pooling=data.pooling,
        )
        await publisher.publish_version(request, created_by=event.source)
    except RegistryError as exc:
        rejected = ModelRejected(
            model_name=data.model_name,
            version=data.version,
            reason=exc.reason,
            rejected_event_id=event.id,
            artifact_digest=data.artifact.digest,
        )
        rejected_id = derive_event_id("model.rejected", event.id)
        return [new_event(rejected, source=SOURCE, event_id=rejected_id)]
    return []


def build_handlers(get_publisher: GetPublisher, get_lineage: GetLineage) -> Handlers:
    """The event-type -> handler table of the registry (dependencies bound here)."""
    handlers = Handlers()
    handlers.register(
        ModelPublished,
        partial(on_model_published, get_publisher=get_publisher, get_lineage=get_lineage),
    )
    for payload_type in PROJECTED:
        # Gateway reports come by the thousand: folded in batches by their own consumer
        # (app.py, slmops_registry.reports), not here one at a time.
        if payload_type not in (ModelPublished, GatewayReport):
            handler = partial(on_lineage_event, get_lineage=get_lineage)
            handlers.register(payload_type, handler)
    return handlers
