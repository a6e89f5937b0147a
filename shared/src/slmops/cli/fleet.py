"""`slmops fleet simulate`: thousands of simulated gateways running the real agent code (the
gateway distribution's simulator, found through :mod:`slmops.fleetsim`) against this
platform's NATS and registry, until Ctrl-C; `slmops fleet list`: the registered gateways,
from the rollout service's fleet record; and `slmops fleet health`: a version's field figures
per class against the class's budgets, from the telemetry service."""

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
    FIRST_CONNECT_S,
    CliSettings,
    JsonOutput,
    RegistryUrl,
    RolloutUrl,
    TelemetryUrl,
    call_json,
    cli_auth,
    console_out,
    fail,
    parse_shares,
)
from slmops.fleetsim import (
    FleetRequest,
    FleetSimulationError,
    FleetSimulator,
    FleetSimulatorMissingError,
    SimulatedFleet,
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
def health(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Model version.")],
    last: Annotated[int, typer.Option(help="Reporting windows behind the figures.")] = 10,
    json_output: JsonOutput = False,
    telemetry_url: TelemetryUrl = None,
) -> None:
    """A version in the field, per variant and class: the gateways' merged figures, each
    against the class's budget, and how far what was served drifted from validation."""
    found = call_json("telemetry", "GET", f"/v1/fleet/health/{name}/{version}", telemetry_url,
                      params={"last": last})  # fmt: skip
    if json_output:
        print(json.dumps(found, indent=2))
        return
    table = Table(title=f"{name} {version} in the field", title_justify="left")
    columns = ("class", "variant", "gateways", "requests", "errors", "p50 ms", "p95 ms",
               "TTFT p95 ms", "tokens/s", "peak MB", "budgets", "drift")  # fmt: skip
    for column in columns:
        table.add_column(column, no_wrap=column != "budgets")
    for row in found:
        figures, drift = row["figures"], row.get("drift")
        table.add_row(
            row["device_class"], row["variant_id"], str(figures["gateways"]),
            str(figures["requests"]), f"{figures['error_rate']:.1%}",
            _number(figures.get("latency_p50_ms")), _number(figures.get("latency_p95_ms")),
            _number(figures.get("ttft_p95_ms")), _number(figures.get("decode_tokens_per_s")),
            _number(figures.get("peak_memory_mb")), _verdicts(row),
            f"{drift['score']:.2f} / {drift['threshold']:g}" if drift else "-",
        )  # fmt: skip
    console_out.print(table, soft_wrap=False)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _verdicts(row: dict[str, Any]) -> str:
    """``latency_p95_ms FAIL (112.4 > 50)``, one per figure with a budget; else why none."""
    if row.get("expectations_error"):
        return f"unknown: {row['expectations_error']}"
    verdicts = []
    for gate in row.get("gates") or []:
        value, budget, passed = gate.get("value"), gate.get("budget"), gate.get("passed")
        if passed is None or value is None or budget is None:
            verdicts.append(f"{gate['name']} not judged")
            continue
        upper = gate.get("bound", "max") == "max"
        sign = ("<=" if upper else ">=") if passed else (">" if upper else "<")
        verdicts.append(f"{gate['name']} {'ok' if passed else 'FAIL'} ({value:.1f} {sign} "
                        f"{budget:g})")  # fmt: skip
    return "; ".join(verdicts) or "no budget"


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
    processes: Annotated[int, typer.Option(help="Processes sharing the fleet, each its part as "
                                           "one site (more cores for a large fleet).")] = 1,
    reports: Annotated[str, typer.Option(help="How wave reports travel: own (a message each), "
                                         "relay (through each site's relay process, "
                                         "SLMOPS_RELAY_SITE=fleetsim-PREFIX[-PART]) or site "
                                         "(batched by the simulated site).")] = "own",
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
        processes=processes,
        reports=reports,
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
            first_connect_s=FIRST_CONNECT_S,
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
    try:
        await fleet.start()
    except FleetSimulationError as exc:
        await bus.close()
        fail(f"the simulated fleet did not start: {exc}")
    console_out.print(f"{request.count} simulated gateways registered in "
               f"{time.monotonic() - started:.1f} s; Ctrl-C stops them")  # fmt: skip
    failed = None
    try:
        await _drive(fleet, stop, started, health_interval_s, duration_s)
    except FleetSimulationError as exc:  # a part of it went away: no point going on
        failed = str(exc)
    finally:
        await fleet.stop()
        await bus.close()
    if failed:
        fail(f"the simulated fleet failed: {failed}")


async def _drive(
    fleet: SimulatedFleet, stop: asyncio.Event, started: float, health_interval_s: float,
    duration_s: float,
) -> None:  # fmt: skip
    """Health rounds every ``health_interval_s``, what the fleet serves every 5 s and once
    more when it stops (however soon that is)."""
    next_health = time.monotonic() + health_interval_s
    while not stop.is_set() and (not duration_s or time.monotonic() - started < duration_s):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(5.0, duration_s or 5.0))
        if stop.is_set():
            break
        if time.monotonic() >= next_health:
            await fleet.report_health(health_interval_s)
            next_health += health_interval_s
        await _print_serving(fleet)
    await _print_serving(fleet)


async def _print_serving(fleet: SimulatedFleet) -> None:
    serving = ", ".join(f"{v}: {n}" for v, n in sorted((await fleet.serving()).items()))
    console_out.print(f"serving - {serving}")
