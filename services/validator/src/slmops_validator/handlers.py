"""validator event handlers: plain async functions, event in, events out.

Consumes optimization.completed and emits validation.* and release.created (issue 5). Until then
the service registers none: it still connects, declares the topology and reports readiness.
"""

from __future__ import annotations

from slmops.bus import Handlers


def build_handlers() -> Handlers:
    """The event-type -> handler table of the validator service (dependencies bound here)."""
    return Handlers()
