"""The device's part of an install: the verified bytes, a second session beside the serving
one, its smoke test - and the proof a rollback must bring."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from slmops.events import GatewayAssignment
from slmops.events.payloads import DesiredModel
from slmops.rollbacks import RollbackRefused, check_rollback
from slmops.service.registry_api import RegistryClient
from slmops.trust import KeyRole, TrustedKeys
from slmops_gateway.delta import fetch_by_chunks
from slmops_gateway.download import download
from slmops_gateway.slots import LoadedModel, SessionOptions, load, smoke_test
from slmops_gateway.verify import Refused, Vouched


async def fetch_load_and_smoke_test(
    desired: DesiredModel, vouched: Vouched, options: SessionOptions, registry: RegistryClient,
    model_dir: Path, serving: LoadedModel | None,
) -> tuple[LoadedModel, int]:  # fmt: skip
    """The loaded, smoke-tested model and how many bytes were downloaded for it."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0)) as client:
        path, fetched = await _fetch(desired, vouched.manifest.chunks_digest, registry, client,
                                     model_dir)  # fmt: skip
    model = await asyncio.to_thread(
        load, path, desired.variant_id, desired.version, options,
        model_name=desired.model_name, runtime_dir=model_dir / "runtime" / desired.variant_id,
    )  # fmt: skip
    await asyncio.to_thread(smoke_test, model, serving)
    return model, fetched


async def _fetch(
    desired: DesiredModel, chunks_digest: str | None, registry: RegistryClient,
    client: httpx.AsyncClient, folder: Path,
) -> tuple[Path, int]:  # fmt: skip
    """A chunked artifact is rebuilt from the chunks held plus the missing ones; others come
    whole (resumed). Either way the bytes are the signed digest's or refused."""
    if chunks_digest is not None:
        result = await fetch_by_chunks(
            chunks_digest, desired.artifact.digest, registry, client, folder
        )
        return result.path, result.fetched_bytes
    url = await registry.download_url(desired.artifact.digest)
    path = await download(url, desired.artifact.digest, desired.artifact.size_bytes, folder,
                          client)  # fmt: skip
    return path, desired.artifact.size_bytes


def check_signed_rollback(assignment: GatewayAssignment, keys: TrustedKeys) -> None:
    """A rollback proves itself with a statement signed by a trusted manifest key."""
    desired, reason = assignment.desired, "no trusted manifest key"
    for public_key in keys.valid(KeyRole.MANIFESTS):
        try:
            check_rollback(
                desired.model_name, desired.manifest_digest, assignment.rollout_id,
                assignment.signature, assignment.signature_expires_at, public_key,
            )  # fmt: skip
            return
        except RollbackRefused as exc:
            reason = str(exc)
    raise Refused(reason)
