"""rollout event handlers: plain async functions, event in, events out.

Gateway reports keep the fleet record (``fleet.py``) that rollouts target, and move their
rollout's state. A release is remembered (the API starts rollouts of it) and, for models with
an automatic policy, rolled out at once. A malformed report never reaches a handler: the
runtime dead-letters it with the reason.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from slmops.bus import HandlerResult, Handlers
from slmops.events import CloudEvent, GatewayReport, ReleaseCreated, TransientError
from slmops.tracing import current_traceparent
from slmops_rollout.engine import Engine
from slmops_rollout.plans import WavePolicy
from slmops_rollout.settings import RolloutSettings

EngineSource = Callable[[], Awaitable[Engine | None]]


async def _engine(engines: EngineSource) -> Engine:
    engine = await engines()
    if engine is None:
        raise TransientError("rollout stores not ready")
    return engine


async def on_gateway_report(
    event: CloudEvent[GatewayReport], engines: EngineSource
) -> HandlerResult:
    engine = await _engine(engines)
    if event.data.kind != "acknowledged":  # the hot path of a wave: only its rollout cares
        record = await engine.gateways.record(event.data)
        if event.data.kind == "registered":
            await engine.welcome(record)
    await engine.on_report(event.data)
    return None


async def on_release(
    event: CloudEvent[ReleaseCreated], engines: EngineSource, settings: RolloutSettings
) -> HandlerResult:
    engine = await _engine(engines)
    release = event.data
    await engine.rollouts.put(f"release.{release.release_id}", release.model_dump_json().encode())
    if (traceparent := current_traceparent()) is not None:  # a rollout asked for later joins it
        await engine.rollouts.put(f"release-trace.{release.release_id}", traceparent.encode())
    if "*" in settings.auto_models or release.model_name in settings.auto_models:
        await engine.start(release, {}, WavePolicy())
    return None


def build_handlers(engines: EngineSource, settings: RolloutSettings) -> Handlers:
    """The event-type -> handler table of the rollout service (dependencies bound here)."""
    handlers = Handlers()
    report: Any = functools.partial(on_gateway_report, engines=engines)
    release: Any = functools.partial(on_release, engines=engines, settings=settings)
    handlers.register(GatewayReport, report)
    handlers.register(ReleaseCreated, release)
    return handlers
