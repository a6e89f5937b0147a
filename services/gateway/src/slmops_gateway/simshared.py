"""What the agents of a simulated fleet share, as one site's gateways would: one registry
cache (manifests are content addressed: caching changes nothing a gateway verifies), one read
of each cohort's state per reconcile pass, and one field profile per (variant, class)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx
import nats.js.errors

from slmops.cohorts import CohortState, cohort_key
from slmops.manifests import Manifest
from slmops.service.registry_api import RegistryClient
from slmops_gateway.sharing import Shared
from slmops_gateway.simfield import FieldProfile, HostFigures

if TYPE_CHECKING:
    from slmops_gateway.simspec import FleetSpec


class CohortReader:
    """Each cohort's state read once for a whole reconcile pass of the fleet."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self._states: dict[int, asyncio.Future[CohortState | None]] = {}

    async def read(self, cohort: int) -> CohortState | None:
        if cohort not in self._states:
            self._states[cohort] = asyncio.ensure_future(self._get(cohort))
        return await asyncio.shield(self._states[cohort])

    async def _get(self, cohort: int) -> CohortState | None:
        try:
            entry = await self.kv.get(cohort_key(cohort))
        except nats.js.errors.KeyNotFoundError:
            return None
        return CohortState.model_validate_json(entry.value or b"{}")


class CachingRegistry(RegistryClient):
    """One registry client for the whole simulated fleet: each manifest, report and the key is
    fetched once (concurrent askers wait for the same request)."""

    def __init__(
        self, base_url: str, client: httpx.AsyncClient | None = None,
        auth: httpx.Auth | None = None,
    ) -> None:  # fmt: skip
        """``auth``: the simulator's one identity (the local stack's ``simulator`` token)."""
        super().__init__(base_url, client, auth)
        self._cache: Shared[tuple[str, str], Any] = Shared()

    async def _once(self, what: str, key: str, fetch: Callable[[], Awaitable[Any]]) -> Any:
        return await self._cache.get((what, key), fetch)  # a failed fetch is not remembered

    async def manifest(self, digest: str) -> dict[str, Any]:
        fetch = super().manifest
        return dict(await self._once("manifest", digest, lambda: fetch(digest)))

    async def variant_report(self, variant_id: str) -> dict[str, Any] | None:
        fetch = super().variant_report
        found = await self._once("report", variant_id, lambda: fetch(variant_id))
        return None if found is None else dict(found)

    async def public_key_pem(self) -> str:
        return str(await self._once("key", "", super().public_key_pem))


class FieldProfiles:
    """What every gateway of the fleet reports about a (variant, class): built once per pair
    from the variant's validation report (the registry client's cached copy) and the spec."""

    def __init__(self, registry: RegistryClient, spec: FleetSpec) -> None:
        self.registry, self.spec = registry, spec
        self._profiles: dict[tuple[str, str], FieldProfile] = {}

    async def prepare(self, variant_id: str, manifest: Manifest, device_class: str) -> None:
        if (variant_id, device_class) in self._profiles:
            return
        try:
            report = await self.registry.variant_report(variant_id)
        except Exception:  # verified moments ago; a hiccup now only costs the host's figures
            report = None
        if (variant_id, device_class) not in self._profiles:
            self._profiles[(variant_id, device_class)] = self._build(
                HostFigures.of(manifest, report), device_class
            )

    def get(self, variant_id: str, device_class: str) -> FieldProfile:
        found = self._profiles.get((variant_id, device_class))
        if found is None:  # installed by other means than the simulated device: defaults
            found = self._profiles[(variant_id, device_class)] = self._build(
                HostFigures.default(), device_class
            )
        return found

    def _build(self, host: HostFigures, device_class: str) -> FieldProfile:
        return FieldProfile.build(host, self.spec.field_slowdown.get(device_class, 1.0),
                                  self.spec.input_shift.get(device_class, 0.0))  # fmt: skip
