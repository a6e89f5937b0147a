"""The demo's run: a simulated fleet, real models published, each stage shown, rollouts.

Everything goes through the platform's public surfaces: the registry's publish API, the
events on NATS (read, never written, except by the simulated gateways' real agent code), the
optimizer's job list and the rollout API. The services do the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from slmops.bus import Bus
from slmops.bus.credentials import NatsCredentials
from slmops.cli.common import FIRST_CONNECT_S, ServiceClient, cli_auth
from slmops.cli.publishing import publish_version
from slmops.demo.chat import ChatGateway, ask, until_serving
from slmops.demo.journey import Journey
from slmops.demo.models import DemoModel
from slmops.events import EventDecodeError, decode_event
from slmops.fleetsim import (
    FleetRequest,
    FleetSimulationError,
    FleetSimulatorMissingError,
    SimulatedFleet,
    load_fleet_simulator,
)
from slmops.settings import PlatformSettings
from slmops.tracing import setup_tracing

_NOT_CONVERTED = ("queued", "waiting", "starting", "fetching", "convert")
_POLL_S = 0.5


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""


@dataclass
class DemoOptions:
    models: list[DemoModel]
    version: str
    run_id: str  # every simulated gateway of this run carries the label run=<run_id>
    gateways: int = 500
    fleet_processes: int = 1  # the simulated fleet's processes (each a part of its gateways)
    classes: dict[str, float] = field(default_factory=lambda: {"x86-avx512-vnni": 1.0})
    percents: list[float] = field(default_factory=lambda: [1.0, 10.0, 50.0, 100.0])
    soak_s: float = 5.0
    health_interval_s: float = 3.0
    timeout_s: float = 3600.0
    registry_url: str = "http://127.0.0.1:8101"
    optimizer_url: str = "http://127.0.0.1:8102"
    rollout_url: str = "http://127.0.0.1:8104"
    console_url: str | None = None  # printed at the end when the stack runs the console
    telemetry_url: str | None = None  # the field loop's figures (--feedback)
    # --feedback: classes slower in the field than on the host, classes served shifted inputs
    field_slowdown: dict[str, float] = field(default_factory=dict)
    input_shift: dict[str, float] = field(default_factory=dict)


@dataclass
class DemoRun:
    """What the run left behind: the journeys, and the live fleet (until ``stop``)."""

    journeys: dict[str, Journey]
    fleet: SimulatedFleet
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> API answer
    talker: ChatGateway | None = None  # a real gateway for the chat model
    chat: dict[str, Any] | None = None  # its streamed answer, once asked


@dataclass
class DemoBuses:
    """The demo's two NATS connections: the simulated fleet's (the simulator identity, as
    narrow as a fleet of gateways) and the journey watcher's (the admin's: it sees all events)."""

    fleet: Bus
    watch: Bus


@contextlib.asynccontextmanager
async def platform_buses(platform: PlatformSettings) -> AsyncIterator[DemoBuses]:
    """The demo's NATS connections; the simulated gateways' spans go with the services'."""
    provider = setup_tracing("slmops-fleetsim", trace_dir=platform.span_files_dir())
    buses: list[Bus] = []
    try:
        for identity in ("simulator", "admin"):
            try:
                buses.append(await Bus.connect(
                    platform.nats_url, source="/slmops/demo",
                    tracer=provider.get_tracer("slmops.fleetsim"),
                    credentials=NatsCredentials.from_settings(platform, identity),
                    first_connect_s=FIRST_CONNECT_S,
                ))  # fmt: skip
            except Exception as exc:
                raise DemoError(f"NATS not reachable at {platform.nats_url} ({exc})") from exc
        yield DemoBuses(*buses)
    finally:
        for bus in buses:
            await bus.close()
        provider.shutdown()  # flushes the last spans to the files


async def start_fleet(
    bus: Bus, options: DemoOptions, console: Console, platform: PlatformSettings
) -> SimulatedFleet:
    """The simulated gateways, registered and listening (the gateway distribution's simulator,
    through :func:`slmops.fleetsim.load_fleet_simulator`)."""
    try:
        simulator = load_fleet_simulator()
    except FleetSimulatorMissingError as exc:
        raise DemoError(str(exc)) from exc
    labels = {"app": [m.app for m in options.models], "run": [options.run_id]}
    # Ids of their own per run: a gateway id of an earlier run may have had another class,
    # and its desired state (for that class) is still in KV.
    request = FleetRequest(
        count=options.gateways, classes=options.classes, labels=labels,
        prefix=f"demo-{options.run_id}", registry_url=options.registry_url,
        registry_auth=cli_auth("simulator"), field_slowdown=options.field_slowdown,
        input_shift=options.input_shift, processes=options.fleet_processes,
    )  # fmt: skip
    try:
        fleet = simulator(bus, request, platform)
    except ValueError as exc:
        raise DemoError(f"cannot simulate this fleet: {exc}") from exc
    began = time.monotonic()
    console.print(
        f"starting {options.gateways} simulated gateways "
        f"({', '.join(f'{c} {s:g}' for c, s in options.classes.items())})"
        + (f" in {options.fleet_processes} processes" if options.fleet_processes > 1 else "")
    )
    try:
        await fleet.start()
    except FleetSimulationError as exc:
        raise DemoError(f"the simulated fleet did not start: {exc}") from exc
    console.print(f"fleet registered in {time.monotonic() - began:.1f} s")
    return fleet


def publish(model: DemoModel, options: DemoOptions, progress: Progress) -> str | None:
    """Upload and publish one model (blocking: run it in a thread); its journey's trace id."""
    size = (
        sum(f.stat().st_size for f in model.path.rglob("*") if f.is_file())
        if (model.path.is_dir())
        else model.path.stat().st_size
    )
    task = progress.add_task(f"{model.key} upload", total=size, note=str(model.path.name))
    fields = {
        "model_name": model.model_name,
        "version": options.version,
        "task": model.task,
        "device_classes": list(options.classes),
        "labels": {"demo": options.run_id},
    }
    with ServiceClient("registry", options.registry_url) as client:
        response = publish_version(
            client, model.path, model.fmt, fields, on_bytes=lambda n: progress.advance(task, n)
        )
    progress.update(task, completed=size)
    trace_id: str | None = response.headers.get("X-Trace-Id")
    return trace_id


class Stages:
    """The progress bars of one journey, created as its stages become known."""

    def __init__(self, progress: Progress, key: str) -> None:
        self.progress, self.key = progress, key
        self.tasks: dict[str, Any] = {}

    def show(self, stage: str, done: float, total: float | None, note: str = "") -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(f"{self.key} {stage}", total=total, note="")
        self.progress.update(self.tasks[stage], completed=done, total=total, note=note)

    def update(self, journey: Journey, jobs: list[dict[str, Any]]) -> None:
        if not journey.planned:
            self.show("plan", 0, None, "waiting for the optimizer's plan")
            return
        self.show(
            "plan",
            1,
            1,
            f"{len(journey.jobs)} jobs over {len(self.classes(journey))} "
            "classes" + (f", skipped {journey.skipped}" if journey.skipped else ""),
        )
        past = {j["job_id"] for j in jobs if not any(w in j["step"] for w in _NOT_CONVERTED)}
        converted = len(past | set(journey.optimized))  # a finished job was converted
        self.show("convert", converted, len(journey.jobs), "to ONNX, per job")
        for device_class, variants in self.classes(journey).items():
            done = sum(1 for v in variants if v in journey.optimized)
            steps = [
                j["step"]
                for j in jobs
                if j["device_class"] == device_class
                and j["state"] not in ("succeeded", "failed", "reused", "cancelled")
            ]
            self.show(f"optimize {device_class}", done, len(variants), "; ".join(steps)[:60])
        passed = sum(1 for v in journey.judged.values() if v == "passed")
        self.show("validate", len(journey.judged), journey.to_judge or None, f"{passed} passed")
        self.show("release", int(journey.pipeline_done), 1, _release_note(journey))
        if journey.rollout_id is not None:
            waves = len(journey.waves)
            note = (
                f"wave {journey.wave_index + 1}/{waves}, {len(journey.applied)} applied, "
                f"{len(journey.failed)} failed"
                + (f" - {journey.outcome}" if journey.outcome else "")
            )
            self.show("rollout", len(journey.acknowledged), journey.targets or None, note)

    @staticmethod
    def classes(journey: Journey) -> dict[str, list[str]]:
        by_class: dict[str, list[str]] = {}
        for variant_id, (device_class, _) in journey.jobs.items():
            by_class.setdefault(device_class, []).append(variant_id)
        return by_class


def _release_note(journey: Journey) -> str:
    if journey.release is None:
        return ""
    return ", ".join(
        f"{e.device_class}: {'yes' if e.variant_id else 'none'}" for e in journey.release.entries
    )


def new_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(bar_width=28),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        refresh_per_second=4,
    )


async def run_demo(
    bus: Bus,
    fleet: SimulatedFleet,
    options: DemoOptions,
    console: Console,
    talker: ChatGateway | None = None,
) -> DemoRun:
    """Models published, every stage followed, each release rolled out to its share of
    ``fleet`` (and to ``talker``, a real gateway, which is then asked a question); returns
    once every rollout has an outcome (or raises DemoError)."""
    journeys = {m.key: Journey(m.model_name, options.version) for m in options.models}
    run = DemoRun(journeys, fleet, talker=talker)

    async def on_message(msg: Any) -> None:
        with contextlib.suppress(EventDecodeError):
            event = decode_event(msg.data)
            for journey in journeys.values():
                journey.fold(event)

    subscription = await bus.nc.subscribe("slmops.>", cb=on_message)
    try:
        with new_progress(console) as progress:
            await _follow(run, options, progress)
    finally:
        await subscription.unsubscribe()
    return run


async def _publish_next(run: DemoRun, options: DemoOptions, progress: Progress) -> None:
    """Models are published one after another, the next once the previous one's journey has
    an outcome (and the chat question was asked): on two cores the first model (the chat
    model) would otherwise share them with the second's jobs and validations, its answer
    would come minutes later and be timed on a busy machine."""
    for index, model in enumerate(options.models):
        journey = run.journeys[model.key]
        if journey.published:
            continue
        previous = run.journeys[options.models[index - 1].key] if index else None
        if previous is None or previous.finished:
            journey.trace_id = await asyncio.to_thread(publish, model, options, progress)
            journey.published = True
        return


async def _follow(run: DemoRun, options: DemoOptions, progress: Progress) -> None:
    stages = {key: Stages(progress, key) for key in run.journeys}
    deadline = time.monotonic() + options.timeout_s
    next_health = time.monotonic()
    async with httpx.AsyncClient(timeout=30.0, auth=cli_auth()) as http:
        while not all(j.finished for j in run.journeys.values()):
            await _chat_when_served(run, options, progress)  # before the next model's jobs
            await _publish_next(run, options, progress)
            if time.monotonic() > deadline:
                raise DemoError(
                    f"no outcome within {options.timeout_s:.0f} s: see `slmops "
                    "jobs list`, `slmops rollout status` and var/logs"
                )
            for model in options.models:
                journey = run.journeys[model.key]
                optimizing = journey.planned and len(journey.optimized) < len(journey.jobs)
                jobs = await _jobs(http, options, journey) if optimizing else []
                ready = journey.release is not None and not journey.finished
                if ready and model.key not in run.rollouts:
                    started = await _start_rollout(http, options, model, journey)
                    if started is not None:
                        run.rollouts[model.key] = started
                stages[model.key].update(journey, jobs)
                for line in journey.news:
                    progress.console.print(line, markup=False, highlight=False)
                journey.news.clear()
            if time.monotonic() >= next_health:  # the health gates judge these
                await run.fleet.report_health(options.health_interval_s)
                next_health = time.monotonic() + options.health_interval_s
            await asyncio.sleep(_POLL_S)
        await _chat_when_served(run, options, progress)


async def _chat_when_served(run: DemoRun, options: DemoOptions, progress: Progress) -> None:
    """Once the chat model's rollout is done and the real gateway serves it: one question,
    its answer streamed to the console (as early as possible: the other models go on)."""
    if run.talker is None or run.chat is not None:
        return
    chat_model = next((m for m in options.models if m.app == "chat"), None)
    journey = run.journeys[chat_model.key] if chat_model else None
    if journey is None or not journey.finished:
        return
    entry = next(
        (e for e in (journey.release.entries if journey.release else [])
         if e.device_class == run.talker.device_class),
        None,
    )  # fmt: skip
    if journey.outcome != "completed" or entry is None or entry.variant_id is None:
        why = entry.reason if entry else journey.outcome_reason or journey.outcome
        run.chat = {"error": f"its class {run.talker.device_class} got no variant to serve: {why}"}
        progress.console.print(f"no chat: {run.chat['error']}", markup=False)
        return
    try:
        await until_serving(run.talker, entry.variant_id)
        run.chat = await ask(run.talker, progress.console)
    except Exception as exc:  # the demo goes on: the answer is one stage of many
        run.chat = {"error": str(exc)}
        progress.console.print(f"the chat request failed: {exc}", markup=False)


async def _jobs(http: httpx.AsyncClient, options: DemoOptions, journey: Journey) -> list[Any]:
    try:
        answer = await http.get(f"{options.optimizer_url}/v1/jobs",
                                params={"model": journey.model_name})  # fmt: skip
    except httpx.HTTPError:
        return []  # progress only: the events still say when jobs finish
    jobs = answer.json() if answer.is_success else []
    ours = (journey.model_name, journey.version)
    return [j for j in jobs if (j.get("model_name"), j.get("version")) == ours]


async def _start_rollout(
    http: httpx.AsyncClient, options: DemoOptions, model: DemoModel, journey: Journey
) -> dict[str, Any] | None:
    """Roll the release out to this model's gateways in waves; a refused rollout (none of this
    model's gateways has a class with a variant) ends the journey at once, with the service's
    reasons per class. None: the rollout service has not taken the release in yet (it is an
    event behind us)."""
    body = {
        "model_name": model.model_name,
        "version": options.version,
        "selector": {"run": options.run_id, "app": model.app},
        "policy": {
            "percents": options.percents,
            "soak_s": options.soak_s,
            "silent_timeout_s": 30.0,
        },
    }
    answer = await http.post(f"{options.rollout_url}/v1/rollouts", json=body)
    if answer.status_code == 404:
        return None
    if answer.status_code == 409:  # nothing to roll out to these gateways: why, per class
        detail = answer.json().get("detail", {})
        reasons = detail.get("reasons", {}) if isinstance(detail, dict) else {}
        why = "; ".join(f"{c}: {r}" for c, r in sorted(reasons.items())) or str(detail)
        journey.outcome, journey.outcome_reason = "nothing to roll out", why
        return {"status": "refused", "reason": why}
    if answer.is_error:
        raise DemoError(f"the rollout service refused the rollout: {answer.text}")
    state: dict[str, Any] = answer.json()
    return state
