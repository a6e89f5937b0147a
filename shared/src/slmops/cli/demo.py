"""`slmops demo` (what `make run` runs): the local stack, real models published, optimized,
validated, released and rolled out in waves to a simulated fleet, each stage shown, then a
report and the trace id. The stack stays up for exploring until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from slmops.auth.local import local_credentials
from slmops.cli.common import fail, parse_shares
from slmops.settings import PlatformSettings
from slmops.stack.status import stack_status, stack_urls, status_json

if TYPE_CHECKING:  # the demo's modules load when it runs: other commands start faster
    from slmops.demo.flow import DemoOptions

_out = Console(highlight=False)
if not _out.is_terminal:  # a log file or CI: room for the progress columns and the report
    _out.width = 150


def _stack_urls(platform: PlatformSettings) -> dict[str, str] | None:
    """Where the running local stack listens (None: not running, or not all ready)."""
    document: dict[str, Any] = status_json(stack_status(platform.var_dir))
    return stack_urls(document) if document["ready"] else None


async def _feedback(loops: list[Any], fleet: Any, options: DemoOptions) -> dict[str, Any]:
    from slmops.cli.common import cli_auth
    from slmops.demo.feedback import FeedbackSettings, follow_loops
    from slmops.demo.report import render_feedback

    assert options.telemetry_url is not None
    slow = ", ".join(f"{c} {f:g}x slower" for c, f in options.field_slowdown.items())
    shifted = ", ".join(f"{c} inputs {s:g} SD away" for c, s in options.input_shift.items())
    _out.print(f"the field loop: {'; '.join(x for x in (slow, shifted) if x)} than validated; "
               "the gateways keep reporting...", markup=False)  # fmt: skip
    settings = FeedbackSettings(options.rollout_url, options.telemetry_url,
                                options.health_interval_s, options.timeout_s)  # fmt: skip
    loops_done = await follow_loops(loops, fleet, settings, _out, cli_auth())
    render_feedback(loops_done, _out)
    return loops_done


def _stack(*args: str) -> None:
    code = subprocess.call([sys.executable, "-m", "slmops.stack", *args])
    if code != 0:
        fail(f"`slmops {' '.join(args)}` failed (exit {code}): see its output above")


def demo(
    models: Annotated[str, typer.Option(help="Models to publish, in this order (the chat model "
                                        "first: its answer comes sooner).")] = "smollm2,minilm",
    gateways: Annotated[int, typer.Option(help="Simulated gateways.")] = 500,
    fleet_processes: Annotated[int, typer.Option(help="Processes the simulated gateways share "
                                                 "(each its part, one site; more cores).")] = 1,
    classes: Annotated[str, typer.Option(help="Device classes of the fleet and their shares; "
                                         "each model is optimized for each.")] = (
        "x86-avx512-vnni=0.7,arm64-pi5=0.3"),
    version: Annotated[str | None, typer.Option(help="Version to publish (default: from the "
                                                "clock, so every run is a new journey).")] = None,
    soak_s: Annotated[float, typer.Option(help="Health gates hold this long per wave.")] = 5.0,
    timeout_s: Annotated[float, typer.Option(help="Give up after this long.")] = 3600.0,
    wait: Annotated[bool, typer.Option(help="After the report keep the stack and the fleet up "
                                       "until Ctrl-C (--no-wait: stop at once).")] = True,
    chat: Annotated[bool, typer.Option(help="Start a real gateway for the chat model and ask "
                                       "it a question once its rollout is done.")] = True,
    json_report: Annotated[Path | None, typer.Option(help="Also write the report as JSON.")] = (
        None),
    feedback: Annotated[bool, typer.Option(help="Close the loop: after the rollouts, one class "
                                           "runs slower in the field (--field-slowdown) and one "
                                           "is served shifted inputs (--input-shift); follow "
                                           "detection, re-optimization, the proposal (approved "
                                           "as an operator) and its rollout.")] = False,
    field_slowdown: Annotated[str, typer.Option(help="With --feedback: classes slower in the "
                                                "field than on the host, CLASS=FACTOR.")] = (
        "arm64-pi5=12"),
    input_shift: Annotated[str, typer.Option(help="With --feedback: classes served inputs "
                                             "shifted by this many baseline SDs, CLASS=SDS "
                                             "('' for none).")] = "x86-avx512-vnni=1.5",
) -> None:  # fmt: skip
    """Run the whole platform on real models: publish -> variants -> validation -> release ->
    rollout over a simulated fleet, with progress per stage, a final report and the trace."""
    from slmops.demo.flow import DemoError, DemoOptions
    from slmops.demo.models import DemoModelMissing, demo_models

    try:
        located = demo_models([m.strip() for m in models.split(",") if m.strip()])
        shares = parse_shares(classes, "--classes")
        slowdown = parse_shares(field_slowdown, "--field-slowdown") if feedback else {}
        shift = parse_shares(input_shift, "--input-shift") if feedback else {}
    except (ValueError, DemoModelMissing) as exc:
        fail(str(exc))
    platform = PlatformSettings()
    urls = _stack_urls(platform)
    started_stack = urls is None
    if started_stack:
        _out.print("starting the local stack (NATS, S3, Ray, services)...")
        _stack("up", "--detach")
        urls = _stack_urls(platform)
        if urls is None:
            fail("the local stack did not become ready: `slmops status` says why")
    assert urls is not None
    options = DemoOptions(
        models=located, version=version or time.strftime("1.%Y%m%d.%H%M%S", time.gmtime()),
        run_id=f"r{int(time.time())}", gateways=gateways, fleet_processes=fleet_processes,
        classes=shares, soak_s=soak_s,
        timeout_s=timeout_s, registry_url=urls["registry"], optimizer_url=urls["optimizer"],
        rollout_url=urls["rollout"], console_url=urls.get("console"),
        telemetry_url=urls.get("telemetry"), field_slowdown=slowdown, input_shift=shift,
    )  # fmt: skip
    if feedback and options.telemetry_url is None:
        fail(
            "--feedback needs the telemetry service: the running stack has none (`slmops up` "
            "starts it)"
        )
    platform = platform.model_copy(update={"nats_url": urls["nats"]})
    log_file = platform.var_dir / "logs" / "demo.log"  # the simulated agents' own logs
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=log_file, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")  # fmt: skip
    try:
        code = asyncio.run(_main(options, platform, wait, json_report, chat))
    except DemoError as exc:
        _out.print(f"error: {exc}", style="red", markup=False)
        code = 1
    finally:
        if started_stack:
            _out.print("stopping the local stack the demo started")
            _stack("down")
    raise typer.Exit(code)


async def _main(options: DemoOptions, platform: PlatformSettings, wait: bool,
                json_report: Path | None, chat: bool) -> int:  # fmt: skip
    from slmops.demo.chat import start_chat_gateway
    from slmops.demo.feedback import FieldLoop, watching
    from slmops.demo.flow import platform_buses, run_demo, start_fleet
    from slmops.demo.report import build_report, render_report

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    talker = None
    loops = [FieldLoop(m.model_name, options.version) for m in options.models]
    async with platform_buses(platform) as buses, watching(buses.watch, loops):
        fleet = await start_fleet(buses.fleet, options, _out, platform)
        try:
            chat_app = next((m.app for m in options.models if m.app == "chat"), None)
            if chat and chat_app:
                talker = await start_chat_gateway(
                    run_id=options.run_id, app=chat_app, nats_url=platform.nats_url,
                    registry_url=options.registry_url, var_dir=platform.var_dir,
                )  # fmt: skip
                _out.print(f"a real gateway for the chat model: {talker.gateway_id} at "
                           f"{talker.url} (its log: {talker.log_path})")  # fmt: skip
            work = asyncio.create_task(run_demo(buses.watch, fleet, options, _out, talker))
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                _out.print("interrupted")
                return 130
            stopped.cancel()
            run = work.result()
            report = await build_report(run, options)
            render_report(report, _out)
            if options.field_slowdown or options.input_shift:
                report["feedback"] = await _feedback(loops, fleet, options)
            if json_report is not None:
                json_report.write_text(json.dumps(report, indent=2, default=str))
            failed = any(m["rollout"]["outcome"] != "completed" for m in report["models"])
            if options.console_url:
                token = local_credentials(platform.var_dir).token_file("admin")
                _out.print(f"the console: {options.console_url}/models (sign in with the "
                           f"admin token in {token})", markup=False, soft_wrap=True)  # fmt: skip
            if wait:
                _out.print(f"the stack and {options.gateways} simulated gateways stay up: try "
                           "`slmops models`, `slmops rollout status`, `slmops lineage NAME "
                           "VERSION`, `slmops trace list`; Ctrl-C stops everything")  # fmt: skip
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 30.0)
                    if not stop.is_set():
                        await fleet.report_health(30.0)
            return 1 if failed else 0
        finally:
            if talker is not None:
                talker.stop()
            await fleet.stop()  # and its registry connections
