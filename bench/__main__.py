"""Run every benchmark and print its table."""

from __future__ import annotations

import asyncio

from bench import (
    bus_throughput,
    console,
    e2e,
    fleet,
    generation,
    optimizer,
    registry_throughput,
    telemetry,
    validator,
    verification,
)


def main() -> None:
    asyncio.run(bus_throughput.main())
    registry_throughput.main()
    generation.main()
    optimizer.main()
    validator.main()
    verification.main()
    fleet.main()
    telemetry.main()
    console.main()
    e2e.main()


if __name__ == "__main__":
    main()
