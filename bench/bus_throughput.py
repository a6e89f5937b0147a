"""Our publish and consume runtime against raw nats-py JetStream, in the same run.

The raw side is what a hand-written nats-py service does with JSON events, and no more:
publish = serialize + ``js.publish_async`` with a ``Nats-Msg-Id``; consume = ``fetch(256)`` +
``json.loads`` + ``ack`` in one loop. Ours: ``Bus.publish_nowait`` (serialize, trace span and
headers, ``Nats-Msg-Id``, pipelined) and ``EventConsumer`` (typed CloudEvent validation, trace
span, bounded concurrent handlers, ack after the handler). Rounds alternate raw/ours on fresh
streams so machine noise hits both alike; the table shows medians and the ratio ours / raw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import nats.errors
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NoOpTracer, Tracer

from slmops.bus import PIPELINE, Bus, EventConsumer, Handlers, Topology
from slmops.events import CloudEvent, ModelPublished
from slmops.settings import ConsumerSettings
from slmops.testing.factories import model_published
from slmops.testing.natsserver import NatsServerProcess

N_MSGS = 20_000
ROUNDS = 5
SUBJECT = ModelPublished.event_type


async def fresh_stream(bus: Bus) -> None:
    with contextlib.suppress(nats.errors.Error):
        await bus.js.delete_stream(PIPELINE.name)
    await bus.declare_stream(PIPELINE)


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


async def main() -> None:
    settings = ConsumerSettings(max_concurrency=256, fetch_batch=256, fetch_timeout_s=0.5)
    # "traced": a real SDK tracer provider (no exporter), so span creation is in the cost, as in
    # a deployed service; "untraced": the OpenTelemetry no-op tracer, the runtime alone.
    tracers: dict[str, Tracer] = {
        "traced": TracerProvider().get_tracer("bench"),
        "untraced": NoOpTracer(),
    }
    results: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServerProcess(Path(tmp))
        server.start()
        bus = await Bus.connect(server.url, source="/slmops/bench")
        await bus.declare(Topology())
        for _ in range(ROUNDS):
            for mode in ("raw", *tracers):
                await fresh_stream(bus)
                events = [model_published() for _ in range(N_MSGS)]
                if mode == "raw":
                    results["raw_pub"].append(await raw_publish(bus, events))
                    results["raw_con"].append(await raw_consume(bus, N_MSGS))
                    continue
                bus.tracer = tracers[mode]
                results[f"pub_{mode}"].append(await our_publish(bus, events))
                results[f"con_{mode}"].append(await our_consume(bus, N_MSGS, settings))
        await bus.close()
        server.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nBus throughput: {N_MSGS} events/round, median of {ROUNDS} alternating rounds")
    print("| path | raw nats-py msgs/s | slmops traced msgs/s | ratio (target >= 0.5) "
          "| slmops untraced msgs/s | ratio |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for label, kind in (("publish (pipelined, acked)", "pub"), ("consume (fetch + ack)", "con")):
        raw, traced, untraced = med[f"raw_{kind}"], med[f"{kind}_traced"], med[f"{kind}_untraced"]
        print(
            f"| {label} | {raw:,.0f} | {traced:,.0f} | {traced / raw:.2f} "
            f"| {untraced:,.0f} | {untraced / raw:.2f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
