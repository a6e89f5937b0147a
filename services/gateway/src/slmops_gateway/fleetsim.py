"""The gateway's fleet simulator as the SDK's commands use it (`slmops fleet simulate`,
`slmops demo`): registered in the entry point group ``slmops.fleet_simulator`` (see
:mod:`slmops.fleetsim`), so the SDK runs it without importing this service."""

from __future__ import annotations

from opentelemetry.sdk.trace import Tracer

from slmops.bus import Bus
from slmops.fleetsim import FleetRequest
from slmops.settings import PlatformSettings
from slmops_gateway.fleetprocesses import FleetProcesses, part_specs
from slmops_gateway.settings import GatewaySettings
from slmops_gateway.simulator import CachingRegistry, SimulatedFleet


class RunningFleet:
    """A :class:`SimulatedFleet` with its registry client: ``stop`` closes both."""

    def __init__(self, fleet: SimulatedFleet, registry: CachingRegistry) -> None:
        self.fleet, self.registry = fleet, registry

    async def start(self) -> None:
        await self.fleet.start()

    async def report_health(self, window_s: float) -> int:
        return await self.fleet.report_health(window_s)

    async def serving(self) -> dict[str, int]:
        return self.fleet.serving()

    async def stop(self) -> None:
        try:
            await self.fleet.stop()
        finally:
            await self.registry.close()


def simulated_fleet(
    bus: Bus, request: FleetRequest, platform: PlatformSettings
) -> RunningFleet | FleetProcesses:
    """The fleet ``request`` asks for (not started): on ``bus``, or in processes of its own
    when it asks for more than one; ValueError if it is invalid."""
    if request.processes != 1:
        # its parts export spans if the caller's bus does (the demo's does, for its trace)
        return FleetProcesses(request, platform, traced=isinstance(bus.tracer, Tracer))
    (spec,) = part_specs(request)
    registry = CachingRegistry(request.registry_url, auth=request.registry_auth)
    fleet = SimulatedFleet(bus, registry, spec, GatewaySettings(platform=platform))
    return RunningFleet(fleet, registry)
