"""registry HTTP API: upload blobs, publish versions, read manifests, keys and download URLs.

Health, readiness and /v1/runtime come from the SDK. Publishing is two calls: ``POST /v1/blobs``
streams an artifact (or evaluation set) into the content-addressed store, then
``POST /v1/models`` publishes a version that references it by digest.
"""

from __future__ import annotations

import asyncio
import re
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from slmops.auth import Principal, Scope
from slmops.events import ChannelMoved, new_event
from slmops.events.payloads import Digest, ModelName, Token, Version
from slmops.manifests import Manifest
from slmops.objectstore import (
    STAGING_PREFIX,
    DigestMismatchError,
    ObjectNotFoundError,
    SizeMismatchError,
)
from slmops.service.auth import Reader, require
from slmops.tracing import current_traceparent
from slmops_registry.context import MaintenanceBusy, RegistryContext
from slmops_registry.errors import RegistryError
from slmops_registry.projection import LineageStore
from slmops_registry.publishing import SOURCE, Publisher, PublishRequest
from slmops_registry.rebuild import ReplayStalled
from slmops_registry.retention import MinAgeTooLow
from slmops_registry.uploads import pipe_upload, spool_upload

router = APIRouter(prefix="/v1", tags=["registry"])

#: Who may put bytes in: publishers, and the services that store variants and reports.
Uploader = Annotated[
    Principal, Depends(require(Scope.PUBLISH, Scope.VARIANTS_WRITE, Scope.REPORTS_WRITE))
]
PublishingPrincipal = Annotated[Principal, Depends(require(Scope.PUBLISH))]
#: What a gateway needs to install: manifests, reports, download URLs, keys.
Installer = Annotated[Principal, Depends(require(Scope.READ, Scope.GATEWAY))]
Operator = Annotated[Principal, Depends(require(Scope.OPERATE))]
Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]


def validated(kind: Any, value: str, what: str) -> str:
    """Path parameters share the event contract's patterns (no traversal, no odd characters)."""
    try:
        return str(TypeAdapter(kind).validate_python(value))
    except ValidationError as exc:
        raise RegistryError(422, f"invalid {what} {value!r}: {exc.errors()[0]['msg']}") from exc


def check_readable(principal: Principal, manifest: Manifest) -> None:
    """A gateway enrolled for a class reads only manifests made for it (403 otherwise)."""
    classes = [manifest.device_class] if manifest.device_class else manifest.device_classes
    if not principal.may_read_class(classes):
        raise RegistryError(
            403, f"{principal.subject} (class {principal.device_class}) may not read a "
            f"{manifest.kind} made for {', '.join(classes)}",
        )  # fmt: skip


async def _publisher(request: Request) -> Publisher:
    publisher: Publisher | None = await request.app.state.registry.publisher()
    if publisher is None:
        raise RegistryError(503, "not connected to NATS yet: see GET /readyz")
    return publisher


async def _lineage(request: Request) -> LineageStore:
    store: LineageStore | None = await request.app.state.registry.lineage()
    if store is None:
        raise RegistryError(503, "not connected to NATS yet: see GET /readyz")
    return store


@router.post("/blobs", status_code=201, summary="Upload an artifact or evaluation set")
async def upload_blob(
    request: Request,
    _: Uploader,
    content_length: Annotated[int | None, Header()] = None,
    x_expected_digest: Annotated[str | None, Header(description="sha256:<hex>")] = None,
) -> dict[str, Any]:
    """Streams the body into the store; answers its digest. Send ``Content-Length`` (a
    shorter body is a truncated upload) and, if known, ``X-Expected-Digest``."""
    registry = request.app.state.registry
    settings = registry.settings
    limit = settings.max_upload_mb * 1024 * 1024
    if x_expected_digest is not None:  # stream straight into the store while receiving
        validated(Digest, x_expected_digest, "X-Expected-Digest")
        store = partial(
            registry.store.put_stream,
            expected_digest=x_expected_digest,
            expected_size=content_length,
        )
        try:
            blob = await pipe_upload(
                request.stream(), store, max_size_bytes=limit, declared_size_bytes=content_length
            )
        except DigestMismatchError as exc:
            raise RegistryError(400, f"digest mismatch: {exc}; nothing was stored") from exc
        except SizeMismatchError as exc:
            raise RegistryError(400, f"truncated upload: {exc}; nothing was stored") from exc
    else:  # the digest is known only at the end: spool, then store the checked file
        spooled = await spool_upload(
            request.stream(),
            spool_dir=settings.spool_dir,
            max_size_bytes=limit,
            declared_size_bytes=content_length,
            expected_digest=None,
        )
        try:
            blob = await asyncio.to_thread(  # hashed while spooling: no second pass
                registry.store.put_file, spooled.path, hashed_digest=spooled.digest
            )
        finally:
            spooled.discard()
    body: dict[str, Any] = blob.model_dump()
    return body


class UploadIntent(BaseModel):
    size_bytes: int = Field(ge=0, description="Size of the file to upload.")


class UploadDone(BaseModel):
    digest: Digest
    size_bytes: int = Field(ge=0)


@router.post("/uploads", status_code=201, summary="A presigned URL to upload a large file")
async def start_upload(body: UploadIntent, request: Request, _: Uploader) -> dict[str, Any]:
    """For files too large to stream through the registry: PUT the file to ``url`` with the
    given headers, then ``POST /v1/uploads/{upload_id}/complete`` with its digest."""
    registry = request.app.state.registry
    limit = registry.settings.max_upload_mb * 1024 * 1024
    if body.size_bytes > limit:
        raise RegistryError(413, f"upload of {body.size_bytes} bytes exceeds the limit of {limit}")
    ttl_s = registry.settings.download_url_ttl_s
    key, url = await asyncio.to_thread(registry.store.presign_staging_put, ttl_s)
    return {
        "upload_id": key.removeprefix(STAGING_PREFIX),
        "url": url,
        "method": "PUT",
        "headers": {"Content-Type": "application/octet-stream"},
        "expires_in_s": ttl_s,
    }


@router.post("/uploads/{upload_id}/complete", status_code=201, summary="Turn an upload into a blob")
async def complete_upload(
    upload_id: str, body: UploadDone, request: Request, _: Uploader
) -> dict[str, Any]:
    if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
        raise RegistryError(422, f"invalid upload id {upload_id!r}")
    store = request.app.state.registry.store
    try:
        blob = await asyncio.to_thread(
            store.promote_staging,
            STAGING_PREFIX + upload_id,
            expected_digest=body.digest,
            expected_size=body.size_bytes,
        )
    except ObjectNotFoundError as exc:
        raise RegistryError(404, f"no upload {upload_id} (expired, or already completed)") from exc
    except (DigestMismatchError, SizeMismatchError) as exc:
        raise RegistryError(400, f"{exc}; the upload was discarded") from exc
    result: dict[str, Any] = blob.model_dump()
    return result


@router.post("/models", summary="Publish a model version whose artifact is uploaded")
async def publish_model(
    body: PublishRequest, request: Request, principal: PublishingPrincipal
) -> JSONResponse:
    publisher = await _publisher(request)
    published = await publisher.publish_version(body, created_by=principal.subject)
    headers = {"X-Event-Id": published.event_id}
    traceparent = current_traceparent()
    if published.created and traceparent:  # this request's trace is the model's journey
        headers["X-Trace-Id"] = traceparent.split("-")[1]
    return JSONResponse(  # the body is the signed manifest; the ids ride in headers
        published.manifest.model_dump(mode="json"),
        status_code=201 if published.created else 200,
        headers=headers,
    )


@router.get("/models", summary="Every published model with its versions")
async def list_models(request: Request, _: Reader) -> list[dict[str, Any]]:
    records = await (await _publisher(request)).catalog.list()
    by_name: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_name.setdefault(record.model_name, []).append(
            record.model_dump(mode="json", exclude={"model_name", "request_digest"})
        )
    return [{"model_name": name, "versions": versions} for name, versions in by_name.items()]


@router.get("/models/{name}", summary="The versions of one model")
async def list_versions(name: str, request: Request, _: Reader) -> list[dict[str, Any]]:
    name = validated(ModelName, name, "model name")
    records = await (await _publisher(request)).catalog.list(name)
    if not records:
        raise RegistryError(404, f"no model {name}")
    return [r.model_dump(mode="json", exclude={"request_digest"}) for r in records]


@router.get("/models/{name}/{version}", summary="The signed manifest of a model version")
async def get_version(name: str, version: str, request: Request, _: Reader) -> dict[str, Any]:
    name, version = validated(ModelName, name, "model name"), validated(Version, version, "version")
    publisher = await _publisher(request)
    record = await publisher.catalog.get(name, version)
    if record is None:
        raise RegistryError(404, f"no model {name} version {version}")
    signed = await publisher.manifest(record.manifest_digest)
    return signed.model_dump(mode="json")


@router.get("/manifests/{digest}", summary="A signed manifest by its digest")
async def get_manifest(digest: str, request: Request, principal: Installer) -> dict[str, Any]:
    digest = validated(Digest, digest, "digest")
    try:
        signed = await (await _publisher(request)).manifest(digest)
    except ObjectNotFoundError as exc:
        raise RegistryError(404, f"no manifest {digest}") from exc
    check_readable(principal, signed.manifest)
    return signed.model_dump(mode="json")


@router.get("/blobs/{digest}/url", summary="A short-lived download URL for a blob")
async def download_url(digest: str, request: Request, _: Installer) -> dict[str, Any]:
    digest = validated(Digest, digest, "digest")
    registry = request.app.state.registry
    blob = await asyncio.to_thread(registry.store.stat, digest)
    if blob is None:
        raise RegistryError(404, f"no blob {digest}")
    ttl_s = registry.settings.download_url_ttl_s
    url = await asyncio.to_thread(registry.store.presign_get, digest, ttl_s)
    return {"digest": digest, "size_bytes": blob.size_bytes, "url": url, "ttl_s": ttl_s}


class UrlRequest(BaseModel):
    digests: list[Digest] = Field(min_length=1, max_length=10_000)


@router.post("/blobs/urls", summary="Short-lived download URLs for many blobs (e.g. chunks)")
async def download_urls(body: UrlRequest, request: Request, _: Installer) -> dict[str, Any]:
    registry = request.app.state.registry
    wanted = sorted(set(body.digests))
    present = await asyncio.gather(*(asyncio.to_thread(registry.store.exists, d) for d in wanted))
    missing = [d for d, found in zip(wanted, present, strict=True) if not found]
    if missing:
        raise RegistryError(404, f"no blob {', '.join(missing[:5])}")
    ttl_s = registry.settings.download_url_ttl_s
    urls = {d: registry.store.presign_get(d, ttl_s) for d in wanted}  # local signing, no I/O
    return {"urls": urls, "ttl_s": ttl_s}


@router.get("/keys", summary="The public key that verifies manifest signatures")
async def keys(request: Request, _: Installer) -> dict[str, Any]:
    signer = request.app.state.registry.signer
    return {"keys": [signer.public_jwk()], "pem": signer.public_key_pem()}


@router.get("/models/{name}/{version}/lineage", summary="Variants, reports, releases, rollouts")
async def lineage(
    name: str,
    version: str,
    request: Request,
    _: Reader,
    gateways: Annotated[
        bool,
        Query(description="Include each gateway's state (one entry per gateway that ran the "
              "version: on a large fleet, thousands; false: an empty `gateways`)."),
    ] = True,
) -> dict[str, Any]:  # fmt: skip
    name, version = validated(ModelName, name, "model name"), validated(Version, version, "version")
    store = await _lineage(request)
    found = await store.get(name, version)
    if found is None:
        raise RegistryError(404, f"no model {name} version {version}")
    states = await store.gateways(name, version) if gateways else []
    result: dict[str, Any] = found.to_api(states)
    return result


@router.post("/admin/gc", summary="Garbage-collect unreferenced blobs (dry-run by default)")
async def garbage_collect(
    request: Request, _: Admin, dry_run: bool = True, min_age_s: float | None = None
) -> dict[str, Any]:
    """Keeps everything a live version needs (manifests, reports, every chunk); objects
    younger than ``min_age_s`` (default the registry's setting, never below a day) stay."""
    registry: RegistryContext = request.app.state.registry
    await _publisher(request), await _lineage(request)  # 503 until connected
    try:
        report = await registry.collect_garbage(
            min_age_s=registry.settings.gc_min_age_s if min_age_s is None else min_age_s,
            dry_run=dry_run,
        )
    except MinAgeTooLow as exc:
        raise RegistryError(422, str(exc)) from None
    except MaintenanceBusy as exc:
        raise RegistryError(409, str(exc)) from None
    return report.to_api()


@router.post(
    "/admin/lineage/rebuild", summary="Rebuild the lineage index aside from the streams, swap it in"
)
async def rebuild_lineage(request: Request, _: Admin) -> dict[str, Any]:
    try:
        counts = await request.app.state.registry.rebuild_lineage()
    except MaintenanceBusy as exc:
        raise RegistryError(409, str(exc)) from None
    except ReplayStalled as exc:
        raise RegistryError(503, str(exc)) from None
    return {"replayed": counts}


class ChannelMove(BaseModel):
    version: Version
    variant_id: Token
    reason: str = ""


@router.get("/channels/{name}", summary="Channels of a model per device class, with history")
async def channels(name: str, request: Request, _: Reader) -> list[dict[str, Any]]:
    name = validated(ModelName, name, "model name")
    store = await _lineage(request)
    books = sorted(await store.channel_books(name), key=lambda b: b.device_class)
    return [book.to_api() for book in books]


@router.put(
    "/channels/{name}/{device_class}/{channel}",
    status_code=202,
    summary="Point a channel at a variant (published as channel.moved, applied by projection)",
)
async def move_channel(
    name: str,
    device_class: str,
    channel: str,
    body: ChannelMove,
    request: Request,
    principal: Operator,
) -> dict[str, Any]:
    name = validated(ModelName, name, "model name")
    device_class, channel = (
        validated(Token, device_class, "device class"),
        validated(Token, channel, "channel"),
    )
    store = await _lineage(request)
    lineage = await store.get(name, body.version)
    variant = lineage.variants.get(body.variant_id) if lineage else None
    if variant is None or variant.device_class != device_class:
        raise RegistryError(
            422, f"{name} {body.version} has no variant {body.variant_id} for {device_class}"
        )
    moved = ChannelMoved(
        model_name=name,
        device_class=device_class,
        channel=channel,
        version=body.version,
        variant_id=body.variant_id,
        reason=body.reason,
        moved_by=principal.subject,
    )
    event = new_event(moved, source=SOURCE)
    await (await _publisher(request)).publish(event)
    return {"event_id": event.id}
