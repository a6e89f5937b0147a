"""JetStream runtime: connection, topology, publishing, the consumer loop, dead-lettering."""

from slmops.bus.batches import BatchConsumer, BatchStats
from slmops.bus.connection import MSG_ID_HEADER, Bus
from slmops.bus.consumer import ConsumerStats, EventConsumer
from slmops.bus.handlers import Handler, HandlerResult, Handlers
from slmops.bus.topology import (
    DEAD_LETTER,
    FLEET,
    KV_BUCKETS,
    LINEAGE_KV,
    MODEL_VERSIONS_KV,
    PIPELINE,
    ROLLOUT,
    STREAMS,
    VARIANTS_KV,
    ConsumerSpec,
    KvSpec,
    StreamSpec,
    Topology,
)

__all__ = [
    "DEAD_LETTER",
    "FLEET",
    "KV_BUCKETS",
    "LINEAGE_KV",
    "MODEL_VERSIONS_KV",
    "MSG_ID_HEADER",
    "PIPELINE",
    "ROLLOUT",
    "STREAMS",
    "VARIANTS_KV",
    "BatchConsumer",
    "BatchStats",
    "Bus",
    "ConsumerSpec",
    "ConsumerStats",
    "EventConsumer",
    "Handler",
    "HandlerResult",
    "Handlers",
    "KvSpec",
    "StreamSpec",
    "Topology",
]
