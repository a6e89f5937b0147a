"""A simulated fleet in several processes, each its part of the gateways as one site: its own
NATS connection, assignment consumer, cohort subscription, registry cache and core.

One event loop drives some thousands of simulated gateways, and on one loop a wave's reports
queue behind each other: what a benchmark then measures is the simulator, not the platform.
Real gateways act on their own CPUs; parts come closer.

:class:`FleetProcesses` (the parent) speaks to each part in JSON lines over its stdin and
stdout: first the part's request, answered ``{"started": <gateways>}`` once they registered and
reconciled; then ``{"op": "health", "window_s": ...}`` and ``{"op": "serving"}``, one answer
line each. A part stops when its stdin closes: its parent stopping it, or gone, so a part never
outlives its fleet. Run as ``python -m slmops_gateway.fleetprocesses`` by the parent only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from slmops.auth import BearerTokenFile
from slmops.collector import collect_less
from slmops.fleetsim import FleetRequest, FleetSimulationError
from slmops.settings import PlatformSettings
from slmops_gateway.simspec import FleetSpec

REPORT_MODES = ("own", "relay", "site")  # see FleetRequest.reports
_START_TIMEOUT_S = 600.0  # importing, connecting, registering and reconciling its gateways
_ANSWER_TIMEOUT_S = 120.0  # a health round of 100,000 gateways on a busy machine
_STOP_TIMEOUT_S = 60.0
_FIRST_CONNECT_S = 10.0  # NATS not there: the part fails with the reason, not waits


class FleetPartError(FleetSimulationError):
    """A part of the fleet failed or went away; the message says which and why."""


def part_specs(request: FleetRequest) -> list[FleetSpec]:
    """The fleet spec of each part (ValueError for a request no part can simulate)."""
    if request.processes < 1:
        raise ValueError(f"processes must be at least 1, not {request.processes}")
    if request.reports not in REPORT_MODES:
        raise ValueError(f"reports travel {' or '.join(map(repr, REPORT_MODES))}, "
                         f"not {request.reports!r}")  # fmt: skip
    if request.processes > request.count:
        raise ValueError(f"{request.processes} processes for {request.count} gateways: "
                         "every process needs one at least")  # fmt: skip
    labels = {key: list(values) for key, values in request.labels.items()}
    faults = cast(Any, dict(request.faults))  # FleetSpec refuses unknown fault names
    return [
        FleetSpec(count=request.count, classes=dict(request.classes), labels=labels,
                  faults=faults, prefix=request.prefix,
                  field_slowdown=dict(request.field_slowdown),
                  input_shift=dict(request.input_shift), part=part, parts=request.processes,
                  site_reports=request.reports == "site", relay=request.reports == "relay")
        for part in range(request.processes)
    ]  # fmt: skip


class FleetProcesses:
    """A :class:`~slmops.fleetsim.SimulatedFleet` whose gateways run in ``request.processes``
    processes. Registry credentials go to them as a token file's path, never as a token.
    ``traced``: the parts export their spans to the platform's span files (as the services do);
    untraced, a part spends nothing on spans."""

    def __init__(
        self, request: FleetRequest, platform: PlatformSettings, traced: bool = False
    ) -> None:
        self.specs = part_specs(request)
        auth = request.registry_auth
        if auth is not None and not isinstance(auth, BearerTokenFile):
            raise ValueError(
                "a fleet in several processes reads its registry credentials from a token "
                "file (SLMOPS_AUTH_TOKEN_FILE or the local stack's)"
            )
        fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
        fields.pop("registry_auth")
        self._request = {**fields, "registry_token_file": str(auth.path) if auth else None,
                         "traced": traced}  # fmt: skip
        # the URL the caller connected to (the demo reads it from the stack's status)
        self._env = {**os.environ, "SLMOPS_NATS_URL": platform.nats_url,
                     "SLMOPS_VAR_DIR": str(platform.var_dir)}  # fmt: skip
        self._parts: list[asyncio.subprocess.Process] = []
        self._lock = asyncio.Lock()  # one question at a time: answers are matched by order

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._parts]

    async def start(self) -> None:
        """Start every part; return once all their gateways registered and reconciled."""
        for part in range(len(self.specs)):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", __name__, env=self._env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            self._parts.append(process)
            self._write(process, {**self._request, "part": part})
        try:
            await self._answers("started", _START_TIMEOUT_S)
        except BaseException:
            self._kill()
            raise

    async def report_health(self, window_s: float) -> int:
        answers = await self._ask({"op": "health", "window_s": window_s}, "reported")
        return sum(int(a["reported"]) for a in answers)

    async def serving(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for answer in await self._ask({"op": "serving"}, "serving"):
            for variant, n in answer["serving"].items():
                counts[variant] = counts.get(variant, 0) + int(n)
        return counts

    async def stop(self) -> None:
        """Every part stops its gateways (removing its consumer) and exits; killed if not.
        Its stdin closed is its signal to stop, so a part that went away is no obstacle."""
        async with self._lock:  # after a question in flight
            try:
                for process in self._parts:
                    assert process.stdin is not None
                    process.stdin.close()
                await asyncio.wait_for(
                    asyncio.gather(*(process.wait() for process in self._parts)), _STOP_TIMEOUT_S
                )
            except TimeoutError:
                pass  # killed below
            finally:
                self._kill()
                self._parts = []

    async def _ask(
        self, question: dict[str, Any], key: str, timeout_s: float = _ANSWER_TIMEOUT_S
    ) -> list[dict[str, Any]]:
        async with self._lock:
            for process in self._parts:
                self._write(process, question)
            return await self._answers(key, timeout_s)

    async def _answers(self, key: str, timeout_s: float) -> list[dict[str, Any]]:
        async def answer(part: int, process: asyncio.subprocess.Process) -> dict[str, Any]:
            assert process.stdout is not None
            line = await process.stdout.readline()
            if not line:
                code = await process.wait()
                raise FleetPartError(f"fleet part {part} exited (code {code}): its stderr says why")
            found: dict[str, Any] = json.loads(line)
            if "error" in found:
                raise FleetPartError(f"fleet part {part}: {found['error']}")
            if key not in found:
                raise FleetPartError(f"fleet part {part} answered {found}, not {key!r}")
            return found

        work = (answer(part, process) for part, process in enumerate(self._parts))
        try:
            return await asyncio.wait_for(asyncio.gather(*work), timeout_s)
        except TimeoutError:
            raise FleetPartError(f"the fleet's parts did not answer within {timeout_s:g} s "
                                 f"({key})") from None  # fmt: skip
        except json.JSONDecodeError as exc:  # a part's answers are its stdout's only lines
            raise FleetPartError(f"a fleet part answered what is not JSON: {exc}") from exc

    @staticmethod
    def _write(process: asyncio.subprocess.Process, message: dict[str, Any]) -> None:
        assert process.stdin is not None
        process.stdin.write(json.dumps(message).encode() + b"\n")

    def _kill(self) -> None:
        for process in self._parts:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()


async def _serve_part(lines: asyncio.StreamReader, say: Callable[[dict[str, Any]], None]) -> None:
    """One part: its gateways, answering the parent's questions until its stdin closes."""
    from slmops.bus import Bus
    from slmops.bus.credentials import NatsCredentials
    from slmops.tracing import setup_tracing
    from slmops_gateway.settings import GatewaySettings
    from slmops_gateway.simulator import CachingRegistry, SimulatedFleet

    fields = json.loads(await lines.readline())
    part, token_file = fields.pop("part"), fields.pop("registry_token_file")
    traced = fields.pop("traced")
    request = FleetRequest(**fields, registry_auth=BearerTokenFile(Path(token_file))
                           if token_file else None)  # fmt: skip
    spec = part_specs(request)[part]
    platform = PlatformSettings()
    provider = (setup_tracing("slmops-fleetsim", trace_dir=platform.span_files_dir())
                if traced else None)  # fmt: skip
    bus = await Bus.connect(
        platform.nats_url, source=f"/slmops/fleetsim/{part}",
        tracer=provider.get_tracer("slmops.fleetsim") if provider else None,
        credentials=NatsCredentials.from_settings(platform, "simulator"),
        first_connect_s=_FIRST_CONNECT_S,
    )  # fmt: skip
    registry = CachingRegistry(request.registry_url, auth=request.registry_auth)
    fleet = SimulatedFleet(bus, registry, spec, GatewaySettings(platform=platform))
    started = False
    try:
        await fleet.start()
        started = True
        collect_less()  # its agents live as long as the part: out of the collector's walks
        say({"started": len(fleet.gateways)})
        while line := await lines.readline():
            question = json.loads(line)
            if question["op"] == "health":
                say({"reported": await fleet.report_health(float(question["window_s"]))})
            elif question["op"] == "serving":
                say({"serving": fleet.serving()})
            else:
                say({"error": f"unknown question {question['op']!r}"})
    finally:
        if started:
            await fleet.stop()
        await registry.close()
        await bus.close()
        if provider is not None:
            provider.shutdown()  # the last spans to the files


async def _main() -> None:
    # The answers go to the parent on stdout; anything else written there (a library's print)
    # goes to stderr instead, so it cannot garble an answer.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def say(answer: dict[str, Any]) -> None:
        answers.write(json.dumps(answer) + "\n")

    loop = asyncio.get_running_loop()
    lines = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(lines), sys.stdin)
    try:
        await _serve_part(lines, say)
    except Exception as exc:  # the parent prints the reason; the traceback goes to stderr
        logging.getLogger(__name__).exception("fleet part failed")
        say({"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from exc


if __name__ == "__main__":
    # Ctrl-C reaches a terminal's whole process group: the parent stops its parts (closing
    # their stdin), so a part does not die half-way on the same key press
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s "
                        "%(message)s")  # fmt: skip
    asyncio.run(_main())
