"""One process of the fleet benchmark's simulated fleet: its part of the gateways.

Run by ``bench.fleet`` (``python -m bench.fleet_worker <count> <prefix> <part> <parts>
<registry url> own|relay|site``, NATS from ``SLMOPS_NATS_URL``; ``relay``: wave reports
through the site's relay process; ``site``: batched here). Prints ``ready`` once its gateways have
registered and reconciled, waits for a line on stdin, stops, and prints what its gateways
serve as one JSON line. Several of these share the fleet as separate sites would: each its own
connection, cohort subscription, consumer and registry cache.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import sys

from slmops.auth import BearerToken, ensure_local_credentials
from slmops.bus import Bus
from slmops.settings import PlatformSettings

CLASS = "x86-avx512-vnni"


async def run(
    count: int, prefix: str, part: int, parts: int, registry_url: str, reports: str
) -> None:
    from slmops_gateway.settings import GatewaySettings
    from slmops_gateway.simulator import CachingRegistry, FleetSpec, SimulatedFleet

    platform = PlatformSettings()
    creds = ensure_local_credentials(platform.var_dir)
    bus = await Bus.connect(platform.nats_url, source=f"/bench/fleet/{part}")
    cache = CachingRegistry(registry_url, auth=BearerToken(creds.token("simulator")))
    spec = FleetSpec(count=count, classes={CLASS: 1.0}, prefix=prefix, part=part, parts=parts,
                     site_reports=reports == "site", relay=reports == "relay")  # fmt: skip
    fleet = SimulatedFleet(bus, cache, spec, GatewaySettings(platform=platform))
    await fleet.start()
    print("ready", flush=True)
    profile_to = os.environ.get("SLMOPS_BENCH_CPROFILE_DIR")  # exact call counts, slower
    profiler = cProfile.Profile() if profile_to else None
    if profiler is not None:
        profiler.enable()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(f"{profile_to}/fleet-{part}.prof")
    serving = fleet.serving()
    await fleet.stop()
    await cache.close()
    await bus.close()
    print(json.dumps(serving), flush=True)


def main() -> None:
    count, prefix, part, parts, registry_url, reports = sys.argv[1:7]
    asyncio.run(run(int(count), prefix, int(part), int(parts), registry_url, reports))


if __name__ == "__main__":
    main()
