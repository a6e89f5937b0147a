"""Upstream systems may publish events without our SDK: plain nats-py + CloudEvents JSON."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from slmops.bus import Bus, Handlers
from slmops.events import CloudEvent, ModelPublished
from slmops.testing.consumers import StartConsumer, fast_consumer_settings
from slmops.testing.natsserver import NatsServerProcess

pytestmark = pytest.mark.integration


async def test_event_from_a_plain_nats_client_is_handled(
    bus: Bus, nats_server: NatsServerProcess, start_consumer: StartConsumer
) -> None:
    received: list[CloudEvent[ModelPublished]] = []
    done = asyncio.Event()

    async def on_published(event: CloudEvent[ModelPublished]) -> None:
        received.append(event)
        done.set()

    handlers = Handlers()
    handlers.register(ModelPublished, on_published)
    await start_consumer(bus, handlers, fast_consumer_settings())
    digest = "sha256:" + "ab" * 32
    body = {  # written by hand, as an upstream training pipeline would
        "specversion": "1.0",
        "id": "trainer-run-981",
        "source": "urn:trainer:nightly",
        "type": "slmops.model.published.v1",
        "time": "2026-11-29T08:00:00Z",
        "datacontenttype": "application/json",
        "data": {
            "model_name": "all-minilm-l6-v2",
            "version": "2.1.0",
            "format": "hf-safetensors",
            "task": "feature-extraction",
            "artifact": {"digest": digest, "size_bytes": 90_000_000, "uri": "s3://up/m.tar"},
        },
    }
    plain = await nats.connect(nats_server.url)

    ack = await plain.jetstream().publish(
        "slmops.model.published.v1", json.dumps(body).encode(), headers={"Nats-Msg-Id": body["id"]}
    )
    await asyncio.wait_for(done.wait(), 10)
    await plain.close()

    assert not ack.duplicate
    (event,) = received
    assert event.id == "trainer-run-981"
    assert event.source == "urn:trainer:nightly"
    assert event.data.format == "hf-safetensors"
    assert event.data.artifact.size_bytes == 90_000_000
    assert event.data.labels == {}  # defaults filled in for fields the producer left out
