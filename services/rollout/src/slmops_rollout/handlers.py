"""rollout event handlers: plain async functions, event in, events out.

Gateway reports keep the fleet record (``fleet.py``) that rollouts target, and move their
rollout's state. A release is remembered (the API starts rollouts of it) and, for models with
an automatic policy, rolled out at once - or, when no gateway it targets has registered yet,
left waiting for them. A failed release is remembered too, so the API refuses to roll it out
with the reasons. A malformed report never reaches a handler: the runtime dead-letters it with
the reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from slmops.bus import HandlerResult, Handlers
from slmops.events import CloudEvent, GatewayReport, ReleaseCreated, ReleaseFailed, TransientError
from slmops.tracing import current_traceparent
from slmops_rollout.engine import Engine
from slmops_rollout.plans import WavePolicy
from slmops_rollout.releases import remember
from slmops_rollout.settings import RolloutSettings
from slmops_rollout.targets import NoVariant

log = logging.getLogger(__name__)
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
    # its trace: a rollout asked for later joins it
    await remember(engine.rollouts, release, current_traceparent())
    if "*" in settings.auto_models or release.model_name in settings.auto_models:
        try:
            await engine.start(release, {}, WavePolicy(), wait=True)
        except NoVariant as exc:  # created by an older validator with nothing in it
            log.warning("%s not rolled out: %s", release.release_id, exc.reasons)
    return None


async def on_release_failed(
    event: CloudEvent[ReleaseFailed], engines: EngineSource
) -> HandlerResult:
    engine = await _engine(engines)
    failed = event.data
    await remember(engine.rollouts, failed)
    why = "; ".join(f"{e.device_class}: {e.reason}" for e in failed.entries)
    log.info("no release of %s %s, nothing to roll out (%s)", failed.model_name,
             failed.version, why)  # fmt: skip
    return None


def build_handlers(engines: EngineSource, settings: RolloutSettings) -> Handlers:
    """The event-type -> handler table of the rollout service (dependencies bound here)."""
    handlers = Handlers()
    report: Any = functools.partial(on_gateway_report, engines=engines)
    release: Any = functools.partial(on_release, engines=engines, settings=settings)
    failed: Any = functools.partial(on_release_failed, engines=engines)
    handlers.register(GatewayReport, report)
    handlers.register(ReleaseCreated, release)
    handlers.register(ReleaseFailed, failed)
    return handlers
