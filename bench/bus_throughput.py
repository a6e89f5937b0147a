"""Our publish and consume runtime against raw nats-py JetStream, in the same run.

The raw side is what a hand-written nats-py service does with JSON events, and no more:
publish = serialize + ``js.publish_async`` with a ``Nats-Msg-Id``; consume = ``fetch(256)`` +
``json.loads`` + ``ack`` in one loop. Ours: ``Bus.publish_nowait`` (serialize, trace span and
headers, ``Nats-Msg-Id``, pipelined) and ``EventConsumer`` (typed CloudEvent validation, trace
span, bounded concurrent handlers, ack after the handler). Rounds alternate raw/ours on fresh
streams so machine noise hits both alike; the table shows medians and the ratio ours / raw.

The same rounds also run against a 3-node JetStream cluster (three ``nats-server`` processes,
routes on loopback) with every stream replicated 3 times, alternating with the single node, so
the second table is the cost of replication: cluster msgs/s over single-node msgs/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats.errors
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NoOpTracer, Tracer

from slmops.bus import PIPELINE, Bus, EventConsumer, Handlers, Topology
from slmops.events import CloudEvent, ModelPublished
from slmops.settings import ConsumerSettings
from slmops.testing.factories import model_published
from slmops.testing.natscluster import nats_cluster
from slmops.testing.natsserver import NatsServerProcess

N_MSGS = 20_000
ROUNDS = 5
SUBJECT = ModelPublished.event_type


async def fresh_stream(bus: Bus, replicas: int) -> None:
    with contextlib.suppress(nats.errors.Error):
        await bus.js.delete_stream(PIPELINE.name)
    await bus.declare_stream(replace(PIPELINE, replicas=replicas))


async def raw_publish(bus: Bus, events: list[CloudEvent[Any]]) -> float:
    start = time.perf_counter()
    for event in events:
        payload = event.to_json()
        await bus.js.publish_async(SUBJECT, payload, headers={"Nats-Msg-Id": event.id})
    await bus.js.publish_async_completed()
    return len(events) / (time.perf_counter() - start)


async def our_publish(bus: Bus, events: list[CloudEvent[Any]]) -> float:
    start = time.perf_counter()
    for event in events:
        await bus.publish_nowait(event)
    await bus.js.publish_async_completed()
    return len(events) / (time.perf_counter() - start)


async def raw_consume(bus: Bus, count: int) -> float:
    sub = await bus.js.pull_subscribe(SUBJECT, durable="bench-raw", stream=PIPELINE.name)
    done, start = 0, time.perf_counter()
    while done < count:
        for msg in await sub.fetch(256, timeout=5):
            json.loads(msg.data)
            await msg.ack()
            done += 1
    elapsed = time.perf_counter() - start
    await sub.unsubscribe()
    return count / elapsed


async def our_consume(bus: Bus, count: int, settings: ConsumerSettings) -> float:
    finished = asyncio.Event()
    handled = 0

    async def noop(event: CloudEvent[ModelPublished]) -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            finished.set()

    handlers = Handlers()
    handlers.register(ModelPublished, noop)
    (spec,) = handlers.consumer_specs("bench", ack_wait_s=30, max_deliver=5)
    await bus.declare_consumer(spec)
    consumer = EventConsumer(bus, spec, handlers, settings)
    start = time.perf_counter()
    await consumer.start()
    await finished.wait()
    while consumer.stats.handled < count:  # noqa: ASYNC110 - the last acks follow the handler
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - start
    await consumer.stop()
    return count / elapsed


async def run_round(
    bus: Bus, replicas: int, tracers: dict[str, Tracer], settings: ConsumerSettings,
    results: dict[str, list[float]], target: str,
) -> None:  # fmt: skip
    """One round of every mode (raw, traced, untraced) on fresh streams of ``target``."""
    for mode in ("raw", *tracers):
        await fresh_stream(bus, replicas)
        events = [model_published() for _ in range(N_MSGS)]
        if mode == "raw":
            results[f"{target}:raw_pub"].append(await raw_publish(bus, events))
            results[f"{target}:raw_con"].append(await raw_consume(bus, N_MSGS))
            continue
        bus.tracer = tracers[mode]
        results[f"{target}:pub_{mode}"].append(await our_publish(bus, events))
        results[f"{target}:con_{mode}"].append(await our_consume(bus, N_MSGS, settings))


async def main() -> None:
    settings = ConsumerSettings(max_concurrency=256, fetch_batch=256, fetch_timeout_s=0.5)
    # "traced": a real SDK tracer provider (no exporter), so span creation is in the cost, as in
    # a deployed service; "untraced": the OpenTelemetry no-op tracer, the runtime alone.
    tracers: dict[str, Tracer] = {
        "traced": TracerProvider().get_tracer("bench"),
        "untraced": NoOpTracer(),
    }
    results: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp, nats_cluster(Path(tmp) / "cluster") as cluster:
        server = NatsServerProcess(Path(tmp) / "single")
        server.start()
        single = await Bus.connect(server.url, source="/slmops/bench")
        await single.declare(Topology())
        replicated = await Bus.connect(cluster.url, source="/slmops/bench")
        await replicated.declare(Topology().sized(3, {}))
        for _ in range(ROUNDS):  # alternating: noise hits both alike
            await run_round(single, 1, tracers, settings, results, "single")
            await run_round(replicated, 3, tracers, settings, results, "cluster")
        await single.close()
        await replicated.close()
        server.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    paths = (("publish (pipelined, acked)", "pub"), ("consume (fetch + ack)", "con"))
    print(f"\nBus throughput: {N_MSGS} events/round, median of {ROUNDS} alternating rounds")
    print("One node:")
    print("| path | raw nats-py msgs/s | slmops traced msgs/s | ratio (target >= 0.5) "
          "| slmops untraced msgs/s | ratio |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for label, kind in paths:
        raw = med[f"single:raw_{kind}"]
        traced, untraced = med[f"single:{kind}_traced"], med[f"single:{kind}_untraced"]
        print(
            f"| {label} | {raw:,.0f} | {traced:,.0f} | {traced / raw:.2f} "
            f"| {untraced:,.0f} | {untraced / raw:.2f} |"
        )
    print("\nOne node (R1) against a 3-node cluster (R3), same rounds:")
    print("| path | 1 node msgs/s | 3-node R3 msgs/s | ratio R3 / 1 node |")
    print("|---|---:|---:|---:|")
    for label, kind in paths:
        for who, key in (("raw nats-py", f"raw_{kind}"), ("slmops traced", f"{kind}_traced")):
            one, three = med[f"single:{key}"], med[f"cluster:{key}"]
            print(f"| {label}, {who} | {one:,.0f} | {three:,.0f} | {three / one:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
