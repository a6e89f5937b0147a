"""gateway event handlers: plain async functions, event in, events out.

Consumes its own slmops.gateway.assignment.v1.<gateway_id> (issue 6). Until then the service
registers none: it still connects, declares the topology and reports readiness.
"""

from __future__ import annotations

from slmops.bus import Handlers


def build_handlers() -> Handlers:
    """The event-type -> handler table of the gateway service (dependencies bound here)."""
    return Handlers()
