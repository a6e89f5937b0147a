"""End to end: MiniLM from publish to a completed rollout, split into compute and platform
overhead, and the platform's per-hop latency beside a raw JetStream hop in the same run.

The local stack runs as processes (its own folder and ports); `slmops demo` publishes the real
all-MiniLM-L6-v2 for two device classes and rolls it out to a simulated fleet. Every figure
comes from the spans the processes exported for that one trace:

- a hop is an event from its producer's ``publish`` span to its consumer's ``process`` span
  (the consumer's span is the child of the producer's, through the ``traceparent`` header):
  serializing, JetStream storing it, the pull consumer fetching it, decoding and validating;
- compute is the time inside the optimizer's and the validator's handlers (conversion, passes
  on Ray Serve, storing variants; ONNX Runtime checks), as the union of their spans;
- the rollout stage is policy: waves that each soak the health gates for ``SOAK_S``;
- platform overhead is the rest of the wall time from the publish request to
  ``rollout.completed``.

The raw hop is bare nats-py against the same nats-server: publish, pull ``fetch(1)`` of it,
ack, on a scratch stream. Run: ``python -m bench.e2e``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
from nats.js.api import StreamConfig

from slmops.testing.attacks import local_user
from slmops.testing.localstack import local_stack
from slmops.traceview import SpanRecord, read_spans

GATEWAYS = 100
# The simulated gateways share processes of their own: on the demo's one event loop (with its
# live display) a wave's reports queue behind each other, and the hop measures that queue.
FLEET_PROCESSES = int(os.environ.get("SLMOPS_BENCH_FLEET_PROCESSES", "2"))
CLASSES = "x86-avx512-vnni=0.5,arm64-pi5=0.5"
SOAK_S = 1.0
RAW_HOPS = 500
TARGET_MS = 10.0
# a wave's hops: cohort notifications (older gateways: assignments) and the gateways' reports
FLEET_EVENTS = ("gateway.", "cohort.")


async def raw_hops(nats_url: str, var_dir: Path, count: int = RAW_HOPS) -> list[float]:
    """Milliseconds from ``js.publish`` to the message in hand, one at a time (as the stack's
    admin: every connection to it needs credentials)."""
    admin = local_user(var_dir, "admin")
    nc = await nats.connect(nats_url, nkeys_seed_str=admin.nkey_seed,
                            inbox_prefix=admin.inbox_prefix)  # fmt: skip
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH_HOP", subjects=["bench.hop"]))
    sub = await js.pull_subscribe("bench.hop", durable="bench-hop")
    hops = []
    try:
        for i in range(count):
            began = time.perf_counter()
            await js.publish("bench.hop", json.dumps({"i": i}).encode())
            (msg,) = await sub.fetch(1, timeout=5)
            hops.append((time.perf_counter() - began) * 1000)
            await msg.ack()
    finally:
        await js.delete_stream("BENCH_HOP")
        await nc.close()
    return hops


_REPORT_PREFIX = "slmops.gateway.report.v1."


def _hop_pairs(spans: list[SpanRecord]) -> Iterator[tuple[str, SpanRecord, SpanRecord]]:
    """(hop name, publish span, process span): each process span with the publish span it is
    the child of or linked from (a batch consumer's span is the child of one, linked to more)."""
    by_id = {s.span_id: s for s in spans}
    for span in spans:
        if not span.name.startswith("process "):
            continue
        for producer_id in (span.parent_id or "", *span.links):
            producer = by_id.get(producer_id)
            if producer and producer.name.startswith("publish "):
                event = span.name.removeprefix("process ")
                if producer.subject.startswith(_REPORT_PREFIX):  # which kind of report
                    event += f" ({producer.subject.removeprefix(_REPORT_PREFIX).split('.')[0]})"
                yield f"{event} -> {span.service}", producer, span


def hops_by_event(spans: list[SpanRecord]) -> dict[str, list[float]]:
    """Per hop: milliseconds from each publish span's start to its process span's start."""
    hops: dict[str, list[float]] = defaultdict(list)
    for name, producer, consumer in _hop_pairs(spans):
        hops[name].append((consumer.start_s - producer.start_s) * 1000)
    return dict(hops)


def publisher_share(spans: list[SpanRecord]) -> dict[str, tuple[list[float], list[float]]]:
    """Per hop: milliseconds inside the publish span (the publisher sending and, for a
    JetStream publish, awaiting the stored acknowledgement) and from its end to the process
    span (negative: the consumer had it before the publisher heard it was stored)."""
    shares: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for name, producer, consumer in _hop_pairs(spans):
        inside, after = shares[name]
        inside.append((producer.end_s - producer.start_s) * 1000)
        after.append((consumer.start_s - producer.end_s) * 1000)
    return dict(shares)


def union_s(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _only(spans: list[SpanRecord], service: str, name: str) -> list[SpanRecord]:
    return [s for s in spans if s.service == service and s.name == name]


def journey_parts(spans: list[SpanRecord]) -> dict[str, float]:
    """Seconds of the journey: total, and the parts that are not platform overhead."""
    (request,) = _only(spans, "registry", "POST /v1/models")
    (done,) = _only(spans, "rollout", "publish rollout.completed.v1")
    (release,) = _only(spans, "rollout", "process release.created.v1")
    optimizing = _only(spans, "optimizer", "process model.published.v1")
    validating = _only(spans, "validator", "process optimization.completed.v1")
    optimize = [(s.start_s, s.end_s) for s in optimizing]
    validate = [(s.start_s, s.end_s) for s in validating]
    rollout = [(release.start_s, done.start_s)]
    compute = union_s(optimize + validate)
    accounted = union_s([(request.start_s, request.end_s), *optimize, *validate, *rollout])
    return {
        "total": done.start_s - request.start_s,
        "publish request (registry checks and records the artifact)": request.duration_s,
        "compute: optimization jobs (conversion, passes on Ray Serve, storing variants)":
            union_s(optimize),
        "compute: validation not overlapping optimization (ONNX Runtime checks)":
            compute - union_s(optimize),
        f"rollout waves (policy: soak {SOAK_S:g} s per wave, {GATEWAYS} simulated gateways "
        f"in {FLEET_PROCESSES} processes)":
            rollout[0][1] - rollout[0][0],
        "gaps between the parts above (not inside any of them)":
            done.start_s - request.start_s - accounted,
    }  # fmt: skip


def critical_hops_s(spans: list[SpanRecord], waves: int) -> float:
    """The hops one journey waits on, inside the parts above: model.published to the
    optimizer, the last optimization.completed to the validator, release.created to the
    rollout service, and per wave an assignment and its report (their p50s)."""
    hops = hops_by_event(spans)
    p50 = {name: statistics.median(values) for name, values in hops.items()}
    chain = ["model.published.v1 -> optimizer", "optimization.completed.v1 -> validator",
             "release.created.v1 -> rollout"]  # fmt: skip
    # a wave reaches gateways by their cohort's notification (older ones by an assignment)
    notified = max(p50.get("cohort.v1 -> fleetsim", 0.0),
                   p50.get("gateway.assignment.v1 -> fleetsim", 0.0))  # fmt: skip
    per_wave = notified + p50.get("gateway.report.v1 (applied) -> rollout", 0.0)
    return (sum(p50.get(h, 0.0) for h in chain) + waves * per_wave) / 1000


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="slmops-bench-e2e-") as tmp,
        local_stack(Path(tmp) / "var") as stack,
    ):
        report = Path(tmp) / "report.json"
        began = time.monotonic()
        demo = subprocess.run(
                [sys.executable, "-m", "slmops.cli.main", "demo", "--models", "minilm",
                 "--gateways", str(GATEWAYS), "--fleet-processes", str(FLEET_PROCESSES),
                 "--classes", CLASSES, "--soak-s", str(SOAK_S),
                 "--no-wait", "--json-report", str(report)],
                env=stack.env, capture_output=True, text=True, check=False,
            )  # fmt: skip
        wall_s = time.monotonic() - began
        if demo.returncode != 0:
            raise SystemExit(f"the demo failed:\n{demo.stdout[-4000:]}\n{demo.stderr[-4000:]}")
        raw = asyncio.run(raw_hops(stack.urls["nats"], stack.var_dir))
        time.sleep(2.0)  # the span files are written within a second
        (model,) = json.loads(report.read_text())["models"]
        spans = read_spans(stack.var_dir / "traces", model["trace_id"])
    print_tables(spans, raw, wall_s, model)


def print_tables(spans: list[SpanRecord], raw: list[float], wall_s: float, model: Any) -> None:
    parts = journey_parts(spans)
    total = parts.pop("total")
    print(
        f"\n## End to end: {model['model_name']} publish -> rollout completed ({len(spans)} "
        f"spans in trace {model['trace_id']}; the demo took {wall_s:.1f} s)\n"
    )
    print("| part | seconds | share |\n|---|---|---|")
    for name, seconds in parts.items():
        print(f"| {name} | {seconds:.2f} | {seconds / total:.1%} |")
    print(f"| **total, publish request -> rollout.completed** | {total:.2f} | 100% |")
    waves = len(model["rollout"]["waves"])
    on_path = critical_hops_s(spans, waves)
    print(f"\nOf which platform hops on the critical path (inside the parts above: the "
          f"pipeline's 3, and {waves} waves x assignment + report): {on_path:.3f} s "
          f"({on_path / total:.2%}).")  # fmt: skip

    raw_p50 = statistics.median(raw)
    hops = hops_by_event(spans)
    every = [h for values in hops.values() for h in values]
    print("\n## Per hop: publish span -> consumer's process span, beside a raw JetStream hop\n")
    print("| hop | n | p50 ms | p95 ms | p50 / raw p50 |\n|---|---|---|---|---|")
    print(f"| raw nats-py publish -> fetch(1) (same server) | {len(raw)} | {raw_p50:.2f} | "
          f"{_pct(raw, 0.95):.2f} | 1.0x |")  # fmt: skip
    for name, values in sorted(hops.items(), key=lambda kv: -len(kv[1])):
        p50 = statistics.median(values)
        print(f"| {name} | {len(values)} | {p50:.2f} | {_pct(values, 0.95):.2f} | "
              f"{p50 / raw_p50:.1f}x |")  # fmt: skip
    pipeline = [h for name, values in hops.items() if not name.startswith(FLEET_EVENTS)
                for h in values]  # fmt: skip
    fleet = [h for name, values in hops.items() if name.startswith(FLEET_EVENTS) for h in values]
    for label, values in (("every pipeline hop (one event at a time)", pipeline),
                          ("every fleet hop (waves of assignments and reports)", fleet),
                          ("every platform hop", every)):  # fmt: skip
        p50 = statistics.median(values)
        print(f"| **{label}** | {len(values)} | {p50:.2f} | {_pct(values, 0.95):.2f} | "
              f"{p50 / raw_p50:.1f}x |")  # fmt: skip
    print("\n## Fleet hops: the publisher's part and the rest\n")
    print("| hop | p50 ms in the publish span | p50 ms from its end to the process span |\n"
          "|---|---|---|")  # fmt: skip
    for name, (inside, after) in sorted(publisher_share(spans).items()):
        if name.startswith(FLEET_EVENTS):
            print(f"| {name} | {statistics.median(inside):.2f} | {statistics.median(after):.2f} |")
    for label, values in (("pipeline", pipeline), ("fleet", fleet)):
        p50 = statistics.median(values)
        verdict = "met" if p50 <= TARGET_MS else "missed"
        print(f"\nTarget platform overhead <= {TARGET_MS:g} ms p50 per hop, {label} hops: "
              f"{verdict} ({p50:.2f} ms; the raw hop is {raw_p50:.2f} ms).")  # fmt: skip


if __name__ == "__main__":
    main()
