"""What the validator's handlers and API share: settings, profiles, registry, models, state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from nats.js.kv import KeyValue

from slmops.bus import Bus
from slmops.events import TransientError
from slmops.objectstore import ObjectStore
from slmops.profiles import DeviceProfile
from slmops.service import ServiceRuntime
from slmops.service.registry_api import RegistryClient
from slmops.trust import KeyRole, TrustedKeys
from slmops.trust.client import TrustClient, TrustError
from slmops_validator.models import ModelCache
from slmops_validator.settings import ValidatorSettings

STATE_BUCKET = "slmops-jobs"  # validation states beside the optimizer's jobs ("validator.*")


@dataclass
class ValidatorContext:
    settings: ValidatorSettings
    profiles: dict[str, DeviceProfile]
    registry: RegistryClient
    # Set by app.py once the runtime exists (the runtime needs the handlers, which need this).
    runtime: ServiceRuntime | None = None
    _cache: ModelCache | None = field(default=None, init=False)
    _slots: asyncio.Semaphore | None = field(default=None, init=False)
    trust: TrustClient | None = None  # the pinned trust root (None: local first use)
    _first_use_keys: TrustedKeys | None = field(default=None, init=False)

    async def manifest_keys(self) -> TrustedKeys:
        """The manifest keys the pinned trust root vouches for (without one, local only: the
        registry's key, fetched once)."""
        if self.trust is not None:
            try:
                return await self.trust.keys()
            except TrustError as exc:  # the registry away, or a repository being fixed
                raise TransientError(str(exc)) from None
        if self._first_use_keys is None:
            pem = await self.registry.public_key_pem()
            self._first_use_keys = TrustedKeys.single(KeyRole.MANIFESTS, pem)
        return self._first_use_keys

    @property
    def bus(self) -> Bus:
        bus = self.runtime.bus if self.runtime else None
        if bus is None:
            raise RuntimeError("not connected to NATS yet")
        return bus

    @property
    def store(self) -> ObjectStore:
        store = self.runtime.store if self.runtime else None
        if store is None:
            raise RuntimeError("no object store yet")
        return store

    @property
    def slots(self) -> asyncio.Semaphore:
        """Bounds the validations in flight (parity runs overlap; latency runs queue)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.max_concurrent_validations)
        return self._slots

    @property
    def models(self) -> ModelCache:
        if self._cache is None:
            root = self.settings.scratch_dir / "models"
            self._cache = ModelCache(root, self.store, self.settings.cache_max_mb)
        return self._cache

    async def state(self) -> KeyValue | None:
        """The state bucket, once NATS is connected and the bucket declared; else None."""
        return await self.runtime.key_value(STATE_BUCKET) if self.runtime else None
