"""Rollout fan-out to a simulated fleet against a bare nats-py request/ack floor, same run.

Per fleet size, on a fresh nats-server: first the floor - one connection holds a subscription
per gateway subject and answers each request; another sends one request per gateway and waits
for every answer (subscriptions are made before the clock starts). Then ours: the rollout
service and the registry as their own processes, and a simulated fleet of real gateway agents
in ``FLEET_PROCESSES`` processes of their own (the gateway's ``fleetprocesses``, as ``slmops
fleet simulate --processes`` runs them; each like a site: one connection, one subscription to
the cohorts' notifications, one consumer for exceptions); its gateways' wave reports one
message each; or sent through a relay process per site (``slmops_gateway.relay``: each report a
core NATS request, the relay stores the site's batches), as real gateways enrolled at a site
send them; or batched by the fleet process itself (``GatewayReports`` without the relay's hop).
The rollout is one wave of every gateway, no soak.
Times are from ``rollout.wave.started``: until every gateway's acknowledgement and every
``applied`` report reached NATS, and until the service announced ``rollout.completed`` (it
has then folded every report in and stored it in KV).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import psutil

from slmops.auth import BearerToken, BearerTokenFile, Scope, ensure_local_credentials
from slmops.bus import Bus, Topology
from slmops.bus.permissions import relay_subject
from slmops.events import new_event
from slmops.fleetsim import FleetRequest
from slmops.settings import PlatformSettings
from slmops.testing.models import tiny_encoder_onnx, with_word_tokenizer
from slmops.testing.natsserver import NatsServerProcess
from slmops.testing.ports import free_port
from slmops.testing.registry import register_variant, release_of

SIZES = (10_000, 100_000)
# the simulated fleet's processes (as sites): one per core, so it is not held to one core
FLEET_PROCESSES = int(os.environ.get("SLMOPS_BENCH_FLEET_PROCESSES", os.cpu_count() or 2))
CLASS = "x86-avx512-vnni"
#: How wave reports travel: one message per report, through sites' relays, or batched by the
#: simulated sites themselves (what a relay does, without its hop).
REPORT_MODES = ("own", "relay", "site")
MODE_NAMES = {"own": "one per gateway", "relay": "sites' relays", "site": "sites' batches"}


@dataclass
class Result:
    count: int
    floor_s: float
    reports: str = "own"  # how wave reports travel: REPORT_MODES
    plan_s: float = 0.0
    acked_s: float = 0.0
    applied_s: float = 0.0
    completed_s: float = 0.0
    messages: int = 0
    service_peak_mb: float = 0.0
    fleet_rss_mb: float = 0.0  # the fleet processes' peak RSS, summed
    register_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # per process, during the wave
    cohort_ms: float = 0.0  # one cohort's state signed, stored and announced: wall time
    cohort_cpu_ms: float = 0.0  # the writer's CPU plus nats-server's, per cohort


async def floor(url: str, count: int) -> float:
    """Bare request/ack to ``count`` per-gateway subjects (the fastest a fan-out can be)."""
    fleet, sender = await nats.connect(url), await nats.connect(url)

    async def answer(msg: Any) -> None:
        await fleet.publish(msg.reply, b"ack")

    for i in range(count):
        await fleet.subscribe(f"floor.gw.{i}", cb=answer)
    await fleet.flush()
    done, answered = asyncio.Event(), 0

    async def on_ack(msg: Any) -> None:
        nonlocal answered
        answered += 1
        if answered == count:
            done.set()

    inbox = sender.new_inbox()
    await sender.subscribe(f"{inbox}.*", cb=on_ack)
    await sender.flush()
    start = time.perf_counter()
    for i in range(count):
        await sender.publish(f"floor.gw.{i}", b"assign", reply=f"{inbox}.{i}")
    await sender.flush()
    await asyncio.wait_for(done.wait(), 600)
    elapsed = time.perf_counter() - start
    await fleet.close()
    await sender.close()
    return elapsed


@contextlib.contextmanager
def service_process(name: str, env: dict[str, str]) -> Any:
    """``slmops_<name>`` as its own process on a free port (killed at the end)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", f"slmops_{name}"],
        env={**os.environ, **env, f"SLMOPS_{name.upper()}_PORT": str(port),
             f"SLMOPS_{name.upper()}_LOG_LEVEL": "warning"},
    )  # fmt: skip
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait(timeout=10)


def profile_wave(pids: dict[str, int], run: str) -> list[subprocess.Popen[bytes]]:
    """With ``SLMOPS_BENCH_PROFILE_DIR`` set: py-spy samples each process through the wave
    (collapsed stacks, ``<dir>/<run>-<process>.txt``), to see where a gateway's cost goes."""
    folder = os.environ.get("SLMOPS_BENCH_PROFILE_DIR")
    if not folder:
        return []
    Path(folder).mkdir(parents=True, exist_ok=True)
    py_spy = str(Path(sys.executable).parent / "py-spy")
    return [
        subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "-r",
                "200",
                "--nonblocking",
                "-o",
                f"{folder}/{run}-{name.replace(' ', '-')}.txt",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
        if name != "nats-server"
    ]


def stop_profiles(profilers: list[subprocess.Popen[bytes]]) -> None:
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
    for profiler in profilers:
        profiler.wait(timeout=60)


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    times = {name: psutil.Process(pid).cpu_times() for name, pid in pids.items()}
    return {name: t.user + t.system for name, t in times.items()}


class SimulatedSites:
    """The simulated fleet in processes of its own (the gateway's ``FleetProcesses``), each
    its part of the gateways as a site; with ``reports="relay"`` each with its relay process."""

    def __init__(
        self, count: int, prefix: str, registry_url: str, parts: int, reports: str
    ) -> None:
        from slmops_gateway.fleetprocesses import FleetProcesses

        platform = PlatformSettings()
        token = ensure_local_credentials(platform.var_dir).token_file("simulator")
        request = FleetRequest(count=count, classes={CLASS: 1.0}, prefix=prefix,
                               registry_url=registry_url, registry_auth=BearerTokenFile(token),
                               processes=parts, reports=reports)  # fmt: skip
        self.fleet = FleetProcesses(request, platform)
        self.sites = [spec.site for spec in self.fleet.specs]
        self.relays = [
            subprocess.Popen(
                [sys.executable, "-m", "slmops_gateway.relay"],
                env={**os.environ, "SLMOPS_RELAY_SITE": site},
                stderr=subprocess.DEVNULL,
            )
            for site in (self.sites if reports == "relay" else [])
        ]

    @property
    def pids(self) -> list[int]:
        return self.fleet.pids

    @property
    def relay_pids(self) -> list[int]:
        return [p.pid for p in self.relays]

    async def ready(self, bus: Bus) -> None:
        for site in self.sites if self.relays else []:  # a relay answers (refuses) a probe
            for _ in range(600):
                with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    await bus.nc.request(relay_subject(site, "probe"), b"{}", timeout=1)
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"the relay of {site} never answered")
        await self.fleet.start()

    async def stop(self) -> dict[str, int]:
        """Stop every part; what the whole fleet serves."""
        serving = await self.fleet.serving()
        await self.fleet.stop()
        return serving

    async def close(self) -> None:
        await self.fleet.stop()  # nothing left to stop after ``stop``
        for relay in self.relays:
            if relay.poll() is None:
                relay.kill()
                relay.wait(timeout=10)


async def ours(bus: Bus, count: int, result: Result, nats_pid: int) -> None:
    env = {k: v for k, v in os.environ.items() if k.startswith("SLMOPS_")}
    # Credentials as `slmops up` mints them (the services find them under SLMOPS_VAR_DIR); the
    # bench itself plays the optimizer, the validator and an operator: every scope.
    creds = ensure_local_credentials(PlatformSettings().var_dir)
    bench_auth = BearerToken(creds.issuer().mint("bench:fleet", frozenset(Scope), 3600))
    with (
        service_process("registry", env) as (registry_process, registry_url),
        service_process("rollout", {**env, "SLMOPS_ROLLOUT_TICK_S": "0.1"}) as (rollout, url),
    ):
        async with (
            httpx.AsyncClient(base_url=registry_url, timeout=60, auth=bench_auth) as registry,
            httpx.AsyncClient(base_url=url, timeout=600, auth=bench_auth) as api,
        ):
            await _ready(registry)
            await _ready(api)
            model = with_word_tokenizer(tiny_encoder_onnx())
            variant = await register_variant(registry, model, device_class=CLASS)
            await bus.publish(new_event(release_of({CLASS: variant}), source="/bench"))
            fleet = SimulatedSites(count, f"b{count}", registry_url, FLEET_PROCESSES,
                                   result.reports)  # fmt: skip
            try:
                began = time.perf_counter()
                await fleet.ready(bus)
                await _until_registered(bus, count)
                result.register_s = time.perf_counter() - began
                await wave(bus, api, fleet, count, variant.variant_id, result,
                           {"rollout service": rollout.pid, "registry": registry_process.pid,
                            "nats-server": nats_pid})  # fmt: skip
            finally:
                await fleet.close()
            await per_cohort(bus, result, nats_pid)


async def wave(
    bus: Bus, api: httpx.AsyncClient, fleet: SimulatedSites, count: int, variant_id: str,
    result: Result, pids: dict[str, int],
) -> None:  # fmt: skip
    """One wave to every gateway, timed and its CPU counted per process (the fleet's
    processes summed as the simulator)."""
    marks = await _watch(bus, count)
    policy = {"percents": [100], "soak_s": 0, "success_threshold": 1.0,
              "max_rate_per_min": 100_000_000, "silent_timeout_s": 3600}  # fmt: skip
    every = {**pids, **{f"fleet {i}": pid for i, pid in enumerate(fleet.pids)},
             **{f"relay {i}": pid for i, pid in enumerate(fleet.relay_pids)}}  # fmt: skip
    cpu_before = cpu_seconds(every)
    profilers = profile_wave(every, f"{count}-{_mode(result).replace(' ', '-')}")
    posted = time.perf_counter()
    started = await api.post("/v1/rollouts", json={
        "model_name": "tiny", "version": "1.0.0", "policy": policy})  # fmt: skip
    assert started.status_code == 201, started.text
    await asyncio.wait_for(marks["completed"].wait(), 1800)
    cpu_after = cpu_seconds(every)
    stop_profiles(profilers)
    result.cpu_s = {name: cpu_after[name] - cpu_before[name] for name in pids}
    for summed, prefix in (("site relays", "relay "), ("fleet simulator", "fleet ")):
        result.cpu_s[summed] = sum(cpu_after[name] - cpu_before[name]
                                   for name in every if name.startswith(prefix))  # fmt: skip
    began_wave = marks["wave"]
    result.plan_s = began_wave - posted
    result.acked_s = marks["acked"] - began_wave
    result.applied_s = marks["applied"] - began_wave
    result.completed_s = marks["completed_at"] - began_wave
    # acknowledgements and applied reports; per cohort a KV put and a notification
    result.messages = 2 * count + 2 * 1024
    result.fleet_rss_mb = sum(peak_mb(pid) for pid in fleet.pids)
    result.service_peak_mb = peak_mb(pids["rollout service"])
    serving = await fleet.stop()
    assert serving.get(variant_id) == count, serving


async def per_cohort(bus: Bus, result: Result, nats_pid: int) -> None:
    """What a wave costs per cohort, whatever its size: every cohort's state rewritten with
    one more entry (signed, stored in KV, announced), as the rollout service does it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from slmops.assignments import AssignmentSigner
    from slmops.cohorts import COHORT_COUNT, CohortEntry
    from slmops.events.payloads import ArtifactRef, DesiredModel
    from slmops_rollout.cohorts import CohortTable

    table = CohortTable(await bus.key_value("slmops-cohorts"), bus,
                        AssignmentSigner(Ed25519PrivateKey.generate()))  # fmt: skip
    await table.load()
    artifact = ArtifactRef(digest="sha256:" + "a" * 64, size_bytes=1, uri="s3://b/a")
    desired = DesiredModel(model_name="tiny", version="2.0.0", variant_id="v-bench",
                           manifest_digest="sha256:" + "b" * 64, artifact=artifact)  # fmt: skip
    entry = CohortEntry(rollout_id="ro-bench", generation=10**9, device_class=CLASS,
                        desired=desired)  # fmt: skip
    server_before = cpu_seconds({"nats": nats_pid})["nats"]
    cpu_before, began = time.process_time(), time.perf_counter()
    await table.reach({c: [entry] for c in range(COHORT_COUNT)}, 10**9)
    wall_s = time.perf_counter() - began
    cpu_s = time.process_time() - cpu_before
    cpu_s += cpu_seconds({"nats": nats_pid})["nats"] - server_before
    result.cohort_ms = 1000 * wall_s / COHORT_COUNT
    result.cohort_cpu_ms = 1000 * cpu_s / COHORT_COUNT


async def _ready(api: httpx.AsyncClient) -> None:
    for _ in range(600):
        with contextlib.suppress(httpx.HTTPError):
            if (await api.get("/readyz")).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError("the rollout service never became ready")


async def _until_registered(bus: Bus, count: int) -> None:
    """Until the rollout service's fleet record holds every simulated gateway."""
    for _ in range(6000):
        info = await bus.js.stream_info("KV_slmops-gateways")
        if info.state.messages >= count:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the fleet never registered")


async def _watch(bus: Bus, count: int) -> dict[str, Any]:
    """Core subscriptions timing the last acknowledgement, applied report and the events."""
    marks: dict[str, Any] = {"completed": asyncio.Event()}
    seen = {"acknowledged": 0, "applied": 0}

    async def on_report(msg: Any) -> None:  # one report, or a site's batch of them
        for kind in seen:
            found = msg.data.count(f'"kind":"{kind}"'.encode())
            if found:
                seen[kind] += found
                mark = "acked" if kind == "acknowledged" else "applied"
                if seen[kind] >= count and mark not in marks:
                    marks[mark] = time.perf_counter()

    async def on_rollout(msg: Any) -> None:
        if msg.subject.startswith("slmops.rollout.wave.started"):
            marks["wave"] = time.perf_counter()
        elif msg.subject.startswith("slmops.rollout.completed"):
            marks["completed_at"] = time.perf_counter()
            marks["completed"].set()

    await bus.nc.subscribe("slmops.gateway.report.v1.>", cb=on_report)
    await bus.nc.subscribe("slmops.gateway.reports.v1.>", cb=on_report)
    await bus.nc.subscribe("slmops.rollout.>", cb=on_rollout)
    await bus.nc.flush()
    return marks


async def measure(count: int, reports: str) -> Result:
    from bench.optimizer.jobs import s3_store

    with tempfile.TemporaryDirectory(prefix="slmops-fleet-") as tmp:
        server = NatsServerProcess(Path(tmp) / "nats")
        server.start()
        os.environ["SLMOPS_NATS_URL"] = server.url
        try:
            result = Result(count=count, floor_s=await floor(server.url, count),
                            reports=reports)  # fmt: skip
            with s3_store(Path(tmp) / "var"):
                bus = await Bus.connect(server.url, source="/bench")
                await bus.declare(Topology())
                assert server.proc is not None
                await ours(bus, count, result, server.proc.pid)
                await bus.close()
            return result
        finally:
            os.environ.pop("SLMOPS_NATS_URL", None)
            server.stop()


def table(results: list[Result]) -> str:
    lines = [
        "| gateways | wave reports | floor: bare request/ack | plan "
        "| all acknowledged (ratio to floor) | all applied | rollout completed | msgs/s "
        "| rollout service peak MB | fleet sim peak MB (all processes) | fleet registered in |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.count:,} | {_mode(r)} | {r.floor_s:.2f} s | {r.plan_s:.2f} s "
            f"| {r.acked_s:.2f} s ({r.acked_s / r.floor_s:.1f}x) | {r.applied_s:.2f} s "
            f"| {r.completed_s:.2f} s "
            f"| {r.messages / r.completed_s:,.0f} | {r.service_peak_mb:.0f} "
            f"| {r.fleet_rss_mb:.0f} | {r.register_s:.1f} s |"
        )
    lines += [
        "",
        "CPU seconds per process from the rollout request until `rollout.completed` "
        "(this host has 2 cores; the simulated devices and the sites' relays share them with "
        "the platform; the platform is the rollout service, the registry and nats-server):",
        "",
        "| gateways | wave reports | "
        + " | ".join(results[0].cpu_s)
        + " | platform CPU ms per gateway | site relays' CPU ms per gateway |",
        "|---|---|" + "---|" * (len(results[0].cpu_s) + 2),
    ]
    for r in results:
        figures = " | ".join(f"{v:.1f}" for v in r.cpu_s.values())
        lines.append(f"| {r.count:,} | {_mode(r)} | {figures} "
                     f"| {1000 * _platform_s(r) / r.count:.2f} "
                     f"| {1000 * r.cpu_s.get('site relays', 0) / r.count:.2f} |")  # fmt: skip
    lines += [
        "",
        "Per cohort (every cohort's signed state rewritten, stored and announced once; the "
        "writer's and nats-server's CPU):",
        "",
        "| fleet run | wave reports | wall ms per cohort | CPU ms per cohort |",
        "|---|---|---|---|",
        *(
            f"| {r.count:,} | {_mode(r)} | {r.cohort_ms:.3f} | {r.cohort_cpu_ms:.3f} |"
            for r in results
        ),
    ]
    return "\n".join(lines)


def _mode(r: Result) -> str:
    return MODE_NAMES[r.reports]


def _platform_s(r: Result) -> float:
    return sum(v for k, v in r.cpu_s.items() if k in _PLATFORM)


_PLATFORM = ("rollout service", "registry", "nats-server")


MODEL_SIZES = ((1_000_000, 1024), (10_000_000, 16_384))  # (gateways, cohorts)


def model(results: list[Result]) -> str:
    """Platform CPU and fold time of a wave to 1,000,000 and 10,000,000 gateways, from the
    largest run's costs per gateway (each process's CPU over the wave / gateways) and per
    cohort. Linear in both: what grows with the fleet is the reports."""
    r = max(results, key=lambda x: x.count)
    per_gw = {k: v / r.count for k, v in r.cpu_s.items() if k in _PLATFORM}
    rollout_gw = per_gw.get("rollout service", 0.0)
    lines = [
        f"Model from the {r.count:,}-gateway run: per gateway "
        + ", ".join(f"{k} {1000 * v:.3f} ms" for k, v in per_gw.items())
        + f"; per cohort {r.cohort_cpu_ms:.3f} ms CPU. The rollout service folds on one core: "
        f"at most {1 / rollout_gw:,.0f} gateways/s."
        if rollout_gw
        else "",
        "",
        "| fleet | cohorts | fan-out CPU (cohorts) | report CPU (rollout + registry) "
        "| broker CPU R1 | one rollout process folds the wave in |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for gateways, cohorts in ((r.count, 1024), *MODEL_SIZES):
        fan_out_s = cohorts * r.cohort_cpu_ms / 1000
        reports_s = gateways * (rollout_gw + per_gw.get("registry", 0.0))
        broker_s = gateways * per_gw.get("nats-server", 0.0)
        lines.append(f"| {gateways:,} | {cohorts:,} | {fan_out_s:.1f} s | {reports_s:,.0f} s "
                     f"| {broker_s:,.0f} s | {gateways * rollout_gw / 60:,.1f} min |")  # fmt: skip
    return "\n".join(lines)


async def run(sizes: tuple[int, ...]) -> list[Result]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return [await measure(n, mode) for n in sizes for mode in REPORT_MODES]


def main() -> None:
    quick = os.environ.get("SLMOPS_BENCH_QUICK") == "1"
    sizes = (10_000,) if quick else SIZES
    results = asyncio.run(run(sizes))
    print("\n## Rollout fan-out to a simulated fleet (one wave, every gateway)\n")
    print(table(results))
    for mode in REPORT_MODES:
        how = MODE_NAMES[mode]
        print(f"\n### Model: a wave to 1,000,000 and 10,000,000 gateways, wave reports: {how}\n")
        print(model([r for r in results if r.reports == mode]))


if __name__ == "__main__":
    main()
