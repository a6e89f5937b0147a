"""Simulated gateway fleets as the SDK's commands see them (`slmops fleet simulate`,
`slmops demo`): what they ask for (:class:`FleetRequest`) and what they drive
(:class:`SimulatedFleet`).

The simulator itself is the gateway's real agent code with the device part simulated, so it
lives in the gateway distribution, which registers a :class:`FleetSimulator` in the entry point
group ``slmops.fleet_simulator``. The SDK finds it there and never imports a service.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from slmops.bus import Bus
from slmops.settings import PlatformSettings

#: Entry point group a distribution registers its fleet simulator in (the gateway's).
FLEET_SIMULATOR_ENTRY_POINT_GROUP = "slmops.fleet_simulator"


@dataclass(frozen=True)
class FleetRequest:
    """What to simulate: how many gateways, their classes and labels, which faults, how the
    field differs from the host per class, and the registry they verify against."""

    count: int
    classes: dict[str, float] = field(default_factory=lambda: {"x86-avx512-vnni": 1.0})
    labels: dict[str, list[str]] = field(default_factory=dict)  # spread over the fleet
    faults: dict[str, float] = field(default_factory=dict)  # shares with a fault, by name
    prefix: str = "sim"  # gateway ids are <prefix>-000000...
    # A class slower in the field than on the validator's host: its latency and TTFT (and
    # decoding) multiplied by this factor
    field_slowdown: dict[str, float] = field(default_factory=dict)
    # A class served other inputs than the variant was validated on: its drift signature
    # moved by this many of the baseline's standard deviations (0: none)
    input_shift: dict[str, float] = field(default_factory=dict)
    registry_url: str = "http://127.0.0.1:8101"
    registry_auth: httpx.Auth | None = None  # the simulator's one identity
    # Processes sharing the fleet, each its part of the gateways as one site (its own NATS
    # connection, consumer, registry cache and core): one event loop drives some thousands of
    # gateways, and on one loop a wave's reports wait for each other, not for the platform
    processes: int = 1
    # How wave reports travel: "own" one message each; "relay" through the site's relay
    # process (`python -m slmops_gateway.relay` per site, as real gateways enrolled at a site
    # send them); "site" batched by the simulator itself, as a relay would
    reports: str = "own"


class SimulatedFleet(Protocol):
    """A running simulated fleet."""

    async def start(self) -> None:
        """Listen for assignments, register every gateway and reconcile it."""

    async def report_health(self, window_s: float) -> int:
        """One round of health reports; how many gateways reported."""

    async def serving(self) -> dict[str, int]:
        """How many gateways run each variant (``"-"``: none yet)."""

    async def stop(self) -> None:
        """Stop listening and close the fleet's registry connections (not ``bus``)."""


class FleetSimulator(Protocol):
    def __call__(
        self, bus: Bus, request: FleetRequest, platform: PlatformSettings
    ) -> SimulatedFleet:
        """A fleet on ``bus`` (not started); ValueError for a request it cannot simulate."""


class FleetSimulationError(Exception):
    """A running simulated fleet failed (a part of it went away, say); the message says why."""


class FleetSimulatorMissingError(Exception):
    """No installed distribution provides a fleet simulator."""


def load_fleet_simulator() -> FleetSimulator:
    """The installed fleet simulator (the gateway distribution's)."""
    found = sorted(
        importlib.metadata.entry_points(group=FLEET_SIMULATOR_ENTRY_POINT_GROUP),
        key=lambda ep: ep.name,
    )
    if not found:
        raise FleetSimulatorMissingError(
            "no fleet simulator is installed (the gateway service provides it): "
            "`make install` installs it"
        )
    if len(found) > 1:
        names = ", ".join(f"{ep.name} ({ep.value})" for ep in found)
        raise FleetSimulatorMissingError(f"more than one fleet simulator is installed: {names}")
    simulator: FleetSimulator = found[0].load()
    return simulator
