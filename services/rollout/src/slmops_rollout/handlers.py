"""rollout event handlers: plain async functions, event in, events out.

Gateway reports keep the fleet record (``fleet.py``) that rollouts target, and move their
rollout's state; they come in batches (``reports.py``), the rest one event at a time. A
release is remembered (the API starts rollouts of it) and, for models with an automatic
policy, rolled out at once - or, when no gateway it targets has registered yet, left waiting
for them. A failed release is remembered too, so the API refuses to roll it out with the
reasons. A release proposed from field evidence is held as a proposal (``proposals.py``)
until an operator approves it, or ``auto_field_releases`` does. A malformed report never
reaches a handler: the consumer dead-letters it with the reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from slmops.bus import HandlerResult, Handlers
from slmops.events import CloudEvent, ReleaseCreated, ReleaseFailed, TransientError
from slmops.events.reports import reports_in
from slmops.tracing import current_traceparent
from slmops_rollout import proposals
from slmops_rollout.engine import Engine
from slmops_rollout.plans import WavePolicy
from slmops_rollout.proposals import proposal_of
from slmops_rollout.releases import remember
from slmops_rollout.reports import fold_reports
from slmops_rollout.settings import RolloutSettings
from slmops_rollout.targets import NotRollable, NoVariant

log = logging.getLogger(__name__)
EngineSource = Callable[[], Awaitable[Engine | None]]
#: Who approved a proposal the policy rolled out (the proposal's ``decided_by``).
AUTO_FIELD_RELEASES = "policy:auto_field_releases"


async def _engine(engines: EngineSource) -> Engine:
    engine = await engines()
    if engine is None:
        raise TransientError("rollout stores not ready")
    return engine


async def on_gateway_reports(events: Sequence[CloudEvent[Any]], engines: EngineSource) -> None:
    """A batch of the fleet stream (``reports.py``): the fleet record and rollouts move."""
    engine = await _engine(engines)
    await fold_reports(engine, reports_in(events))


async def on_release(
    event: CloudEvent[ReleaseCreated], engines: EngineSource, settings: RolloutSettings
) -> HandlerResult:
    engine = await _engine(engines)
    release = event.data
    # its trace: a rollout asked for later joins it
    await remember(engine.rollouts, release, current_traceparent())
    proposal = proposal_of(release)
    if proposal is not None:  # held for an operator: auto_models never rolls it out
        kept = await proposals.remember(engine.rollouts, proposal)
        # approved already: a redelivery finishes an approval that died before its rollout
        if settings.auto_field_releases and kept.status in ("pending", "approved"):
            await _approve_by_policy(engine, release)
        return None
    if "*" in settings.auto_models or release.model_name in settings.auto_models:
        try:
            await engine.start(release, {}, WavePolicy(), wait=True)
        except NoVariant as exc:  # created by an older validator with nothing in it
            log.warning("%s not rolled out: %s", release.release_id, exc.reasons)
    return None


async def _approve_by_policy(engine: Engine, release: ReleaseCreated) -> None:
    try:  # waiting for gateways, if none of the class runs the model yet
        await proposals.approve(engine, release.release_id, AUTO_FIELD_RELEASES, wait=True,
                                reason="auto_field_releases is on")  # fmt: skip
    except (NotRollable, proposals.Undecidable) as exc:  # nothing in it / decided meanwhile
        log.warning("proposal %s not rolled out: %s", release.release_id, exc)


async def on_release_failed(
    event: CloudEvent[ReleaseFailed], engines: EngineSource
) -> HandlerResult:
    engine = await _engine(engines)
    failed = event.data
    proposal = proposal_of(failed)
    if proposal is not None:  # a re-optimization found nothing within the field budget
        await proposals.remember(engine.rollouts, proposal)
        log.warning("proposal %s of %s %s has no candidate: %s", failed.release_id,
                    failed.model_name, failed.version, proposal.reasons)  # fmt: skip
        return None
    await remember(engine.rollouts, failed)
    why = "; ".join(f"{e.device_class}: {e.reason}" for e in failed.entries)
    log.info("no release of %s %s, nothing to roll out (%s)", failed.model_name,
             failed.version, why)  # fmt: skip
    return None


def build_handlers(engines: EngineSource, settings: RolloutSettings) -> Handlers:
    """The event-type -> handler table of the rollout service (dependencies bound here)."""
    handlers = Handlers()
    release: Any = functools.partial(on_release, engines=engines, settings=settings)
    failed: Any = functools.partial(on_release_failed, engines=engines)
    handlers.register(ReleaseCreated, release)
    handlers.register(ReleaseFailed, failed)
    return handlers
