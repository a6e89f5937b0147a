"""rollout event handlers: plain async functions, event in, events out.

Gateway reports keep the fleet record (``fleet.py``) that rollouts target and gate on. A
malformed report never reaches a handler: the runtime dead-letters it with the reason.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.kv import KeyValue

from slmops.bus import HandlerResult, Handlers
from slmops.events import CloudEvent, GatewayReport, TransientError
from slmops_rollout.fleet import record_report

KvSource = Callable[[], Awaitable[KeyValue | None]]


async def on_gateway_report(event: CloudEvent[GatewayReport], gateways: KvSource) -> HandlerResult:
    kv = await gateways()
    if kv is None:
        raise TransientError("gateway store not ready")
    await record_report(kv, event.data)
    return None


def build_handlers(gateways: KvSource) -> Handlers:
    """The event-type -> handler table of the rollout service (dependencies bound here)."""
    handlers = Handlers()
    handler: Any = functools.partial(on_gateway_report, gateways=gateways)
    handlers.register(GatewayReport, handler)
    return handlers
