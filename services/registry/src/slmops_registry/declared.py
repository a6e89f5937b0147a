"""What gateways declared about themselves (class and labels): whether a site speaks for them.

The lineage takes a wave report a site's batch carried only for a gateway that declared that
site itself (``slmops.events.reports.may_carry``). The registry learns declarations from the
gateways' own registrations on its report consumer; one it has not seen (registered before
this process started) it looks up once in the rollout service's fleet record of the gateway,
which the rollout service folds from the same registrations.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping

from slmops.events import GatewayReport

Declaration = tuple[str, Mapping[str, str]]  # (device class, labels)
#: A gateway's declaration as the fleet records hold it (None: no record).
Lookup = Callable[[str], Awaitable[Declaration | None]]
_MAX_KNOWN = 1_000_000  # gateways remembered (then forgotten and looked up again)


class Declarations:
    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup
        self._known: dict[str, Declaration] = {}
        # one object per distinct declaration: a fleet has few label sets, many gateways
        self._shared: dict[tuple[str, tuple[tuple[str, str], ...]], Declaration] = {}

    def heard(self, report: GatewayReport) -> None:
        """A gateway's own report: what it declares now."""
        key = (report.device_class, tuple(sorted(report.labels.items())))
        declaration = self._shared.setdefault(key, (report.device_class, dict(report.labels)))
        if len(self._known) >= _MAX_KNOWN:
            self._known.clear()
            self._shared.clear()
        self._known[report.gateway_id] = declaration

    def of(self, gateway_id: str) -> Declaration | None:
        return self._known.get(gateway_id)

    async def resolve(self, gateway_ids: Iterable[str]) -> None:
        """Look up the gateways not heard from yet (each once, side by side)."""
        wanted = list({g for g in gateway_ids if g not in self._known})
        found = await asyncio.gather(*(self.lookup(g) for g in wanted))
        for gateway_id, declaration in zip(wanted, found, strict=True):
            if declaration is not None:
                self._known[gateway_id] = declaration


def declaration_of(record: bytes) -> Declaration | None:
    """The class and labels in a fleet record's JSON (None: not one)."""
    try:
        data = json.loads(record)
        return str(data["device_class"]), {str(k): str(v) for k, v in data["labels"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
