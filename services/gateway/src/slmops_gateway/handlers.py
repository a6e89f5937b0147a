"""gateway event handlers: plain async functions, event in, events out.

Consumes only ``slmops.gateway.assignment.v1.<its id>`` (its own durable consumer, filtered to
its subject: another gateway's assignment is never delivered here). An assignment is the
notification; the agent installs it and answers with a ``gateway.report``.
"""

from __future__ import annotations

import functools
from typing import Any

from slmops.bus import HandlerResult, Handlers
from slmops.events import CloudEvent, GatewayAssignment, derive_event_id, new_event
from slmops_gateway.agent import Agent


async def on_assignment(event: CloudEvent[GatewayAssignment], agent: Agent) -> HandlerResult:
    report = await agent.apply(event.data)
    if report is None:
        return None
    # One report per (gateway, generation, outcome): a redelivered assignment re-sends it.
    key = f"{report.gateway_id}/{report.generation}/{report.kind}"
    return [new_event(report, source=f"/slmops/gateway/{report.gateway_id}",
                      event_id=derive_event_id("gateway.report", key))]  # fmt: skip


def build_handlers(agent: Agent) -> Handlers:
    """The event-type -> handler table of this gateway (its own assignment subject only)."""
    handlers = Handlers()
    subject = f"{GatewayAssignment.event_type}.{agent.settings.gateway_id}"
    handler: Any = functools.partial(on_assignment, agent=agent)
    handlers.register(GatewayAssignment, handler, subject=subject)
    return handlers
