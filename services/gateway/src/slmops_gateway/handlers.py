"""gateway event handlers: plain async functions, event in, events out.

Consumes only ``slmops.gateway.assignment.v1.<its id>`` (its own durable consumer, filtered to
its subject: another gateway's assignment is never delivered here) - a gateway without the
cohort protocol; one with it hears the same subject as core NATS messages (``app.AgentLoop``).
An assignment is the notification; the agent installs it and answers with a ``gateway.report``.
"""

from __future__ import annotations

import functools
from typing import Any

from slmops.bus import HandlerResult, Handlers
from slmops.events import CloudEvent, GatewayAssignment
from slmops.events.reports import report_event
from slmops_gateway.agent import Agent


async def on_assignment(event: CloudEvent[GatewayAssignment], agent: Agent) -> HandlerResult:
    report = await agent.apply(event.data)
    return None if report is None else [report_event(report)]


def build_handlers(agent: Agent) -> Handlers:
    """The event-type -> handler table of this gateway (its own assignment subject only)."""
    handlers = Handlers()
    subject = f"{GatewayAssignment.event_type}.{agent.settings.gateway_id}"
    handler: Any = functools.partial(on_assignment, agent=agent)
    handlers.register(GatewayAssignment, handler, subject=subject)
    return handlers
