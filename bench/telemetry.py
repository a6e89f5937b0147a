"""Telemetry ingest: a 100,000-gateway fleet's health reports folded, beside a bare nats-py
fetch + ack of the same stream, in one run; detection latency and false findings.

* The SLMOPS_FLEET stream (the platform's own config) on a real nats-server is pre-filled with
  one reporting round of 100,000 gateways (``--quick``: 10,000): a health report each, with
  latency and TTFT histograms, decode sums, peak memory and a drift signature (embedding
  moments and token log-probabilities: every optional aggregate, the largest report a gateway
  sends), from three classes over ten sites, built from templates of simulated samples.
* (a) bare: a nats-py pull consumer, ``fetch(batch)`` + ``msg.ack()`` per message, no decoding.
  (b) ours: :class:`~slmops.bus.BatchConsumer` (the same fetch size) with ``decode_report`` and
  ``FleetView.fold``: reports/s, CPU per report (this process; the broker's beside it), the
  ratios to the arrival rate (100,000 / 30 s) and to (a); the view's memory and ``dirty()``.
* (c) detection latency: a 10,000-gateway fleet over 10 windows, folded in event-time order
  (no wall sleeps), detection every simulated second; one class 3x slower from window 4, one
  class's inputs shifted from window 4: from the first bad report to each finding.
  (d) the same fleet and span without the fault: findings (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import numpy as np
import psutil
from nats.js.api import AckPolicy, ConsumerConfig

from slmops.bus import FLEET, BatchConsumer, Bus, ConsumerSpec, Topology
from slmops.events.envelope import CloudEvent, event_model
from slmops.events.payloads import GatewayReport, HealthAggregate
from slmops.profiles import Budgets
from slmops.settings import ConsumerSettings
from slmops.telemetry import DriftSignature, Sketch, embedding_moments, token_logprobs
from slmops.testing.natsserver import NatsServerProcess
from slmops.testing.polling import until, until_answered
from slmops_telemetry.detect import DetectionSettings
from slmops_telemetry.expectations import Expectations, HostFigures
from slmops_telemetry.handlers import decode_report, detect_once, on_reports
from slmops_telemetry.view import FleetView

WINDOW_S = 30.0
FETCH_BATCH = 2000
SITES = 10
TEMPLATES_PER_SITE = 4
T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp()
DETECT_WINDOWS, FAULT_WINDOW = 10, 4


@dataclass(frozen=True)
class Klass:
    name: str
    variant_id: str
    share: float
    latency_ms: float
    ttft_ms: float
    decode_tokens_per_s: float
    budgets: Budgets


CLASSES = (
    Klass("x86-avx512-vnni", "v-bench-x86", 0.5, 12.0, 90.0, 40.0,
          Budgets(max_size_mb=512, max_peak_memory_mb=2048, max_ttft_ms=500,
                  min_decode_tokens_per_s=20)),
    Klass("arm64-pi5", "v-bench-pi5", 0.3, 110.0, 600.0, 12.0,
          Budgets(max_size_mb=256, max_peak_memory_mb=1024, max_latency_p95_ms=250,
                  max_ttft_ms=1500, min_decode_tokens_per_s=8)),
    Klass("jetson-orin-gpu", "v-bench-orin", 0.2, 9.0, 60.0, 60.0,
          Budgets(max_size_mb=1024, max_peak_memory_mb=4096, max_latency_p95_ms=50,
                  max_ttft_ms=300, min_decode_tokens_per_s=30)),
)  # fmt: skip
SLOW, SHIFTED = "arm64-pi5", "jetson-orin-gpu"
DIMS = 384


# --- reports ---------------------------------------------------------------------------------


_TOPICS = np.random.default_rng(0).standard_normal((2, DIMS))  # what the served texts are about


def samples_signature(rng: np.random.Generator, n: int, shift: float) -> DriftSignature:
    """Embeddings around one topic; ``shift`` moves them towards another (1: halfway)."""
    embeddings = rng.standard_normal((n, DIMS)) + _TOPICS[0] + shift * _TOPICS[1]
    logprobs = (-rng.exponential(1.0, n * 30)).tolist()
    return DriftSignature(embedding=embedding_moments(embeddings),
                          logprobs=token_logprobs(logprobs))  # fmt: skip


def template(k: Klass, site: int, seed: int, *, slow: float = 1.0, shift: float = 0.0) -> bytes:
    """A report body with ``@GW@``, ``@ID@`` and ``@TIME@`` to fill in per gateway."""
    rng = np.random.default_rng([seed, site, len(k.name), int(slow * 10), int(shift * 10)])
    requests = 60  # 2 a second
    latency = rng.lognormal(math.log(k.latency_ms * slow), 0.3, requests)
    ttft = rng.lognormal(math.log(k.ttft_ms * slow), 0.3, requests)
    tokens = int(rng.integers(2000, 4000))
    health = HealthAggregate(
        window_s=WINDOW_S, request_count=requests, error_rate=float(rng.integers(0, 2)) / requests,
        latency_p50_ms=float(np.median(latency)), latency_p95_ms=float(np.percentile(latency, 95)),
        latency_ms=Sketch.from_values(latency.tolist()).to_wire(),
        ttft_ms=Sketch.from_values(ttft.tolist()).to_wire(), decode_tokens=tokens,
        decode_s=tokens / k.decode_tokens_per_s * slow,
        peak_memory_mb=float(rng.uniform(200, 400)),
        drift=samples_signature(rng, requests, shift),
    )  # fmt: skip
    data = GatewayReport(gateway_id="GW", kind="health", device_class=k.name,
                         labels={"site": f"s{site}", "tier": "edge"}, variant_id=k.variant_id,
                         health=health, model_name="bench-telemetry", version="1.0.0")  # fmt: skip
    event = event_model(GatewayReport)(id="ID", source="/slmops/gateway", type=data.event_type,
                                       time=datetime.fromtimestamp(T0, UTC), data=data)  # fmt: skip
    body = event.to_json()
    stamp = event.model_dump(mode="json")["time"].encode()
    return (body.replace(b'"gateway_id":"GW"', b'"gateway_id":"@GW@"')
            .replace(b'"id":"ID"', b'"id":"@ID@"').replace(stamp, b"@TIME@"))  # fmt: skip


@dataclass
class Fleet:
    count: int
    faults: bool = False  # SLOW 3x slower and SHIFTED's inputs moved, from FAULT_WINDOW on
    layout: list[tuple[str, Klass, int]] = field(default_factory=list)
    templates: dict[tuple[str, int, bool], list[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for g in range(self.count):
            share, k = (g % 1000) / 1000, CLASSES[-1]
            for candidate in CLASSES:
                if share < candidate.share:
                    k = candidate
                    break
                share -= candidate.share
            self.layout.append((f"gw-{g:07d}", k, g % SITES))
        for k in CLASSES:
            for site in range(SITES):
                for bad in (False, True) if self.faults else (False,):
                    slow = 3.0 if bad and k.name == SLOW else 1.0
                    shift = 1.0 if bad and k.name == SHIFTED else 0.0
                    self.templates[(k.name, site, bad)] = [
                        template(k, site, seed, slow=slow, shift=shift)
                        for seed in range(TEMPLATES_PER_SITE)]  # fmt: skip

    def round(self, window: int) -> Iterator[tuple[float, bytes]]:
        """Every gateway's report of one window, in time order, spread over the window."""
        bad = self.faults and window >= FAULT_WINDOW
        for g, (gateway, k, site) in enumerate(self.layout):
            at = T0 + window * WINDOW_S + (g + 0.5) * WINDOW_S / self.count
            stamp = datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")
            body = self.templates[(k.name, site, bad)][g % TEMPLATES_PER_SITE]
            yield at, (body.replace(b"@GW@", gateway.encode())
                       .replace(b"@ID@", str(uuid.uuid4()).encode())
                       .replace(b"@TIME@", stamp.encode()))  # fmt: skip


def expectations(rng_seed: int = 1) -> dict[tuple[str, str], Expectations]:
    """Each class's budgets and the variant's baseline (the evaluation set's signature)."""
    rng = np.random.default_rng(rng_seed)
    baseline = samples_signature(rng, 2000, 0.0)
    return {(k.variant_id, k.name): Expectations(k.variant_id, k.name, k.budgets,
                                                 HostFigures({}, baseline, None))
            for k in CLASSES}  # fmt: skip


# --- ingest ----------------------------------------------------------------------------------


@dataclass
class Ingest:
    reports: int = 0
    report_bytes: float = 0.0
    prefill_s: float = 0.0
    bare_s: float = 0.0
    bare_cpu_s: float = 0.0
    bare_server_cpu_s: float = 0.0
    fold_s: float = 0.0
    fold_cpu_s: float = 0.0
    fold_server_cpu_s: float = 0.0
    handler_cpu_s: float = 0.0
    view_mb: float = 0.0
    steady_mb: float = 0.0  # what three more rounds add to the view (traced)
    dirty_s: float = 0.0
    dirty_entries: int = 0
    dirty_kb: float = 0.0


async def prefill(bus: Bus, fleet: Fleet, result: Ingest) -> None:
    began, size = time.perf_counter(), 0
    for i, (_, body) in enumerate(fleet.round(0)):
        gateway = body.split(b'"gateway_id":"', 1)[1].split(b'"', 1)[0].decode()
        await bus.nc.publish(f"{GatewayReport.event_type}.health.{gateway}", body)
        size += len(body)
        if i % 5000 == 4999:
            await bus.nc.flush()
    await bus.nc.flush()

    async def stored() -> bool:
        return (await bus.js.stream_info(FLEET.name)).state.messages >= fleet.count

    await until_answered(stored, "the stream pre-filled", timeout_s=600, every_s=0.05)
    result.reports, result.report_bytes = fleet.count, size / fleet.count
    result.prefill_s = time.perf_counter() - began


def cpu_s(process: psutil.Process | None = None) -> float:
    if process is None:
        return time.process_time()
    times = process.cpu_times()
    return float(times.user + times.system)


async def bare(bus: Bus, count: int, server: psutil.Process, result: Ingest) -> None:
    await bus.js.add_consumer(FLEET.name, ConsumerConfig(
        durable_name="bench-bare", ack_policy=AckPolicy.EXPLICIT, ack_wait=60,
        max_ack_pending=FETCH_BATCH * 2))  # fmt: skip
    sub = await bus.js.pull_subscribe_bind("bench-bare", FLEET.name)
    began, cpu, server_cpu, done = time.perf_counter(), cpu_s(), cpu_s(server), 0
    while done < count:
        try:
            msgs = await sub.fetch(FETCH_BATCH, timeout=1.0)
        except (nats.errors.TimeoutError, TimeoutError):
            continue
        for msg in msgs:
            await msg.ack()
        done += len(msgs)
    await bus.nc.flush()
    result.bare_s, result.bare_cpu_s = time.perf_counter() - began, cpu_s() - cpu
    result.bare_server_cpu_s = cpu_s(server) - server_cpu
    await sub.unsubscribe()


async def ours(bus: Bus, count: int, server: psutil.Process, result: Ingest) -> FleetView:
    spec = ConsumerSpec(FLEET.name, "bench-fold", ("slmops.gateway.report.>",), ack_wait_s=60.0,
                        max_deliver=5, max_ack_pending=FETCH_BATCH * 2)  # fmt: skip
    await bus.declare_consumer(spec)
    view = FleetView(WINDOW_S)
    rss = psutil.Process().memory_info().rss
    handler_cpu = 0.0

    async def handle(events: list[CloudEvent[Any]]) -> None:
        nonlocal handler_cpu
        began = time.process_time()
        on_reports(events, view)
        handler_cpu += time.process_time() - began

    settings = ConsumerSettings(fetch_batch=FETCH_BATCH, fetch_timeout_s=1.0, ack_wait_s=60.0)
    consumer = BatchConsumer(bus, spec, handle, settings, decode=decode_report)
    began, cpu, server_cpu = time.perf_counter(), cpu_s(), cpu_s(server)
    await consumer.start()
    await until(lambda: consumer.stats.handled >= count, "every report folded", timeout_s=3600,
                every_s=0.005)  # fmt: skip
    await bus.nc.flush()
    result.fold_s, result.fold_cpu_s = time.perf_counter() - began, cpu_s() - cpu
    result.fold_server_cpu_s = cpu_s(server) - server_cpu
    result.handler_cpu_s = handler_cpu
    await consumer.stop()
    assert view.stats.folded == count, view.stats
    result.view_mb = (psutil.Process().memory_info().rss - rss) / 1e6
    began = time.perf_counter()
    stored = view.dirty()
    result.dirty_s = time.perf_counter() - began
    result.dirty_entries, result.dirty_kb = len(stored), sum(map(len, stored.values())) / 1e3
    return view


async def ingest(count: int) -> Ingest:
    result = Ingest()
    fleet = Fleet(count)
    with tempfile.TemporaryDirectory(prefix="slmops-telemetry-") as tmp:
        server = NatsServerProcess(Path(tmp) / "nats")
        server.start()
        try:
            assert server.proc is not None
            broker = psutil.Process(server.proc.pid)
            bus = await Bus.connect(server.url, source="/slmops/bench")
            await bus.declare(Topology())
            await prefill(bus, fleet, result)
            await bare(bus, count, broker, result)
            view = await ours(bus, count, broker, result)
            await bus.close()
            # The next three rounds folded directly, allocations traced: what the view keeps
            # (three windows open with their ids; decoded batches are freed again).
            tracemalloc.start()
            for window in (1, 2, 3):
                bodies = [body for _, body in fleet.round(window)]
                for i in range(0, len(bodies), FETCH_BATCH):
                    on_reports([decode_report(b) for b in bodies[i : i + FETCH_BATCH]], view)
                del bodies
            result.steady_mb = tracemalloc.get_traced_memory()[0] / 1e6
            tracemalloc.stop()
        finally:
            server.stop()
    return result


# --- detection -------------------------------------------------------------------------------


@dataclass
class Detection:
    gateways: int
    windows: int
    first_bad_at: float = 0.0
    found_at: dict[str, float] = field(default_factory=dict)  # signal/metric -> event time
    healthy_findings: int = 0
    fold_s: float = 0.0


async def detect_run(fleet: Fleet) -> tuple[float | None, dict[str, float], int]:
    """Fold the fleet's windows in time order, detecting every simulated second."""
    view, settings, expected = FleetView(WINDOW_S), DetectionSettings(), expectations()
    found: dict[str, float] = {}
    findings: list[Any] = []
    seen: set[str] = set()
    first_bad: float | None = None
    tick = T0 + 1.0

    async def publish(finding: Any) -> None:
        findings.append(finding)

    for window in range(DETECT_WINDOWS):
        batch: list[bytes] = []
        for at, body in fleet.round(window):
            if first_bad is None and fleet.faults and window >= FAULT_WINDOW:
                first_bad = at
            batch.append(body)
            if at >= tick:
                on_reports([decode_report(b) for b in batch], view)
                batch = []
                for finding in await detect_once(view, expected, settings, publish, seen, tick):
                    name = getattr(finding, "metric", None) or f"drift:{finding.signal}"
                    found.setdefault(f"{finding.device_class} {name}", tick)
                tick += 1.0
        on_reports([decode_report(b) for b in batch], view)
    for _ in range(int(WINDOW_S) + 5):  # the last window closes and settles
        await detect_once(view, expected, settings, publish, seen, tick)
        tick += 1.0
    return first_bad, found, len(findings)


async def detection(gateways: int) -> Detection:
    result = Detection(gateways, DETECT_WINDOWS)
    began = time.perf_counter()
    first_bad, found, _ = await detect_run(Fleet(gateways, faults=True))
    result.first_bad_at, result.found_at = first_bad or 0.0, found
    _, _, result.healthy_findings = await detect_run(Fleet(gateways))
    result.fold_s = time.perf_counter() - began
    return result


# --- the table -------------------------------------------------------------------------------


def table(r: Ingest, d: Detection) -> str:
    arrival = r.reports / WINDOW_S
    bare_rate, fold_rate = r.reports / r.bare_s, r.reports / r.fold_s
    lines = [
        f"\n## Telemetry ingest: {r.reports:,} gateways' health reports "
        f"({r.report_bytes / 1e3:.1f} KB each, one 30 s round), fetch batch {FETCH_BATCH}\n",
        f"| path | reports/s | x arrival ({arrival:,.0f}/s) | x bare | CPU µs/report (this "
        "process) | broker CPU µs/report |",
        "|---|---:|---:|---:|---:|---:|",
        f"| (a) bare nats-py fetch + ack | {bare_rate:,.0f} | {bare_rate / arrival:.1f} | 1.00 "
        f"| {1e6 * r.bare_cpu_s / r.reports:.1f} | {1e6 * r.bare_server_cpu_s / r.reports:.1f} |",
        f"| (b) BatchConsumer + decode + FleetView.fold | {fold_rate:,.0f} "
        f"| {fold_rate / arrival:.1f} | {fold_rate / bare_rate:.2f} "
        f"| {1e6 * r.fold_cpu_s / r.reports:.1f} (fold alone "
        f"{1e6 * r.handler_cpu_s / r.reports:.1f}) | {1e6 * r.fold_server_cpu_s / r.reports:.1f} |",
        "",
        f"Targets: fold >= 6,700 reports/s ({'met' if fold_rate >= 6700 else 'MISSED'}), "
        f">= 0.5x bare ({'met' if fold_rate >= 0.5 * bare_rate else 'MISSED'}). View after the "
        f"round: {r.view_mb:.0f} MB RSS growth (process); three more rounds add "
        f"{r.steady_mb:.1f} MB to the view (traced: three windows open with their ids); "
        f"dirty(): {r.dirty_entries} KV entries, "
        f"{r.dirty_kb:.0f} KB, {1e3 * r.dirty_s:.0f} ms. Pre-fill: {r.prefill_s:.1f} s.",
        "",
        f"Detection on {d.gateways:,} gateways over {d.windows} windows of {WINDOW_S:.0f} s "
        f"(event time; detection every simulated second; faults from window {FAULT_WINDOW}):",
        "",
        "| finding | after the first bad report | windows | after the 2nd bad window's end |",
        "|---|---:|---:|---:|",
    ]
    second_end = T0 + (FAULT_WINDOW + 2) * WINDOW_S
    for name, at in sorted(d.found_at.items()):
        latency = at - d.first_bad_at
        lines.append(f"| {name} | {latency:.0f} s | {latency / WINDOW_S:.2f} "
                     f"| {at - second_end:+.0f} s |")  # fmt: skip
    if not d.found_at:
        lines.append("| (none found) | | | |")
    lines += ["", f"(d) Findings on the healthy fleet over the same span: {d.healthy_findings} "
                  f"({'met' if d.healthy_findings == 0 else 'MISSED'}: must be 0). "
                  f"Detection runs took {d.fold_s:.0f} s."]  # fmt: skip
    return "\n".join(lines)


async def run(quick: bool) -> str:
    count = 10_000 if quick else 100_000
    result = await ingest(count)
    found = await detection(2_000 if quick else 10_000)
    return table(result, found)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="10,000 gateways (CI-sized)")
    args = parser.parse_args(argv if argv is not None else [])
    quick = args.quick or os.environ.get("SLMOPS_BENCH_QUICK", "") not in ("", "0")
    print(asyncio.run(run(quick)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(f"\nPeak RSS of the bench process: {peak:.0f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
