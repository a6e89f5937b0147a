"""`slmops fleet simulate`: thousands of simulated gateways running the real agent code (the
gateway distribution's simulator, found through :mod:`slmops.fleetsim`) against this
platform's NATS and registry, until Ctrl-C; and `slmops fleet list`: the registered gateways,
from the rollout service's fleet record."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from slmops.bus import Bus
from slmops.bus.credentials import NatsCredentials
from slmops.cli.common import (
    CliSettings,
    JsonOutput,
    RegistryUrl,
    RolloutUrl,
    call_json,
    cli_auth,
    console_out,
    fail,
    parse_shares,
)
from slmops.fleetsim import (
    FleetRequest,
    FleetSimulator,
    FleetSimulatorMissingError,
    load_fleet_simulator,
)
from slmops.settings import PlatformSettings

app = typer.Typer(help="Simulated gateway fleets.", no_args_is_help=True)


@app.command("list")
def list_gateways(
    device_class: Annotated[str | None, typer.Option("--class", help="Only this class.")] = None,
    selector: Annotated[list[str], typer.Option(help="key=value labels to match "
                                                "(repeatable).")] = [],  # noqa: B006
    json_output: JsonOutput = False,
    rollout_url: RolloutUrl = None,
) -> None:  # fmt: skip
    """Registered gateways, counted by class and by what they run (--json: every gateway)."""
    params: dict[str, Any] = {"selector": selector}
    if device_class:
        params["device_class"] = device_class
    found = call_json("rollout", "GET", "/v1/gateways", rollout_url, params=params)
    if json_output:
        print(json.dumps(found, indent=2))
        return
    counts: dict[tuple[str, str], int] = {}
    for gateway in found:
        key = (gateway["device_class"], gateway.get("running_variant_id") or "-")
        counts[key] = counts.get(key, 0) + 1
    table = Table(title=f"{len(found)} gateways", title_justify="left")
    for column in ("class", "running", "gateways"):
        table.add_column(column, no_wrap=True)
    for (cls, variant), n in sorted(counts.items()):
        table.add_row(cls, variant, str(n))
    console_out.print(table, soft_wrap=False)


@app.command()
def simulate(
    count: Annotated[int, typer.Option(help="How many gateways.")] = 500,
    classes: Annotated[str, typer.Option(help="Device classes and shares, e.g. "
                                         "x86-avx512-vnni=0.7,arm64-pi5=0.3.")] = "x86-avx512-vnni",
    faults: Annotated[str, typer.Option(help="Shares of the fleet with a fault: download, "
                                        "smoke, latency, shadow, silent (e.g. silent=0.01).")] = "",
    label: Annotated[list[str], typer.Option(help="KEY=V1,V2: labels spread over the fleet "
                                             "(repeatable).")] = [],  # noqa: B006
    prefix: Annotated[str, typer.Option(help="Gateway ids are PREFIX-000000...")] = "sim",
    field_slowdown: Annotated[str, typer.Option(help="Classes slower in the field than on the "
                                                "validator's host: CLASS=FACTOR (latency and "
                                                "TTFT times it), e.g. arm64-pi5=3.")] = "",
    input_shift: Annotated[str, typer.Option(help="Classes served shifted inputs: CLASS=SDS "
                                             "(the drift signature moved by that many baseline "
                                             "standard deviations), e.g. "
                                             "x86-avx512-vnni=1.5.")] = "",
    health_interval_s: Annotated[float, typer.Option(help="Seconds between health "
                                                     "reports.")] = 30.0,
    duration_s: Annotated[float, typer.Option(help="Stop after this long (0: Ctrl-C).")] = 0.0,
    registry_url: RegistryUrl = None,
) -> None:  # fmt: skip
    """Run a simulated fleet: register, reconcile, verify, install (simulated), report."""
    try:
        simulator = load_fleet_simulator()
    except FleetSimulatorMissingError as exc:
        fail(str(exc))
    labels: dict[str, list[str]] = {}
    for item in label:
        key, _, values = item.partition("=")
        if not key or not values:
            fail(f"--label must be KEY=V1,V2, not {item!r}")
        labels[key] = values.split(",")
    request = FleetRequest(
        count=count,
        classes=parse_shares(classes, "--classes"),
        labels=labels,
        faults=parse_shares(faults, "--faults"),
        prefix=prefix,
        field_slowdown=parse_shares(field_slowdown, "--field-slowdown"),
        input_shift=parse_shares(input_shift, "--input-shift"),
        registry_url=registry_url or CliSettings().registry_url,
        registry_auth=cli_auth("simulator"),
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the fleet stops cleanly
        asyncio.run(_run(simulator, request, health_interval_s, duration_s))


async def _run(
    simulator: FleetSimulator, request: FleetRequest, health_interval_s: float, duration_s: float
) -> None:
    platform = PlatformSettings()
    try:
        bus = await Bus.connect(
            platform.nats_url,
            source="/slmops/fleetsim",
            credentials=NatsCredentials.from_settings(platform, "simulator"),
        )
    except Exception as exc:
        fail(f"NATS not reachable at {platform.nats_url} ({exc}): start it with `slmops up`")
    stop = asyncio.Event()  # SIGTERM or Ctrl-C: stop cleanly (the fleet's consumer is removed)
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    try:
        fleet = simulator(bus, request, platform)
    except ValueError as exc:
        await bus.close()
        fail(str(exc))
    started = time.monotonic()
    await fleet.start()
    console_out.print(f"{request.count} simulated gateways registered in "
               f"{time.monotonic() - started:.1f} s; Ctrl-C stops them")  # fmt: skip
    next_health = time.monotonic() + health_interval_s
    try:
        while not stop.is_set() and (not duration_s or time.monotonic() - started < duration_s):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(5.0, duration_s or 5.0))
            if time.monotonic() >= next_health:
                await fleet.report_health(health_interval_s)
                next_health += health_interval_s
            serving = ", ".join(f"{v}: {n}" for v, n in sorted(fleet.serving().items()))
            console_out.print(f"serving - {serving}")
    finally:
        await fleet.stop()
        await bus.close()
