"""A consumer process for the at-least-once test (run as a script, not collected by pytest).

Its handler performs the effect (publishes an event whose id derives from the input's id),
records that it started, and - when WORKER_HANG=1 - hangs before returning, so the test can
SIGKILL it between effect and ack.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from slmops.bus import Bus, EventConsumer, Handlers, Topology
from slmops.events import CloudEvent, ModelPublished, OptimizationFailed, derive_event_id, new_event
from slmops.testing.consumers import fast_consumer_settings


async def main(nats_url: str, marker_dir: Path) -> None:
    bus = await Bus.connect(nats_url, source="/slmops/worker")
    await bus.declare(Topology())
    hang = os.environ.get("WORKER_HANG") == "1"

    async def on_published(
        event: CloudEvent[ModelPublished],
    ) -> list[CloudEvent[OptimizationFailed]]:
        effect = new_event(
            OptimizationFailed(
                model_name=event.data.model_name, version=event.data.version, reason="effect"
            ),
            source="/slmops/worker",
            event_id=derive_event_id(event.id, "effect"),
        )
        await bus.publish(effect)  # the effect is durable before we may be killed
        marker = {"pid": os.getpid(), "event": event.id}
        (marker_dir / f"started-{os.getpid()}.json").write_text(json.dumps(marker))
        if hang:
            await asyncio.Event().wait()
        return [effect]  # published again by the runtime: de-duplicated by its id

    handlers = Handlers()
    handlers.register(ModelPublished, on_published)
    settings = fast_consumer_settings(ack_wait_s=2.0)
    (spec,) = handlers.consumer_specs("worker", ack_wait_s=2.0, max_deliver=5)
    await bus.declare_consumer(spec)
    consumer = EventConsumer(bus, spec, handlers, settings)
    await consumer.start()
    (marker_dir / f"ready-{os.getpid()}").touch()
    while consumer.stats.handled == 0:
        await asyncio.sleep(0.05)
    await consumer.stop()
    await bus.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
