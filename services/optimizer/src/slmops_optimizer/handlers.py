"""optimizer event handlers: plain async functions, event in, events out.

Consumes model.published and fans out optimization jobs (issue 4). Until then the service
registers none: it still connects, declares the topology and reports readiness.
"""

from __future__ import annotations

from slmops.bus import Handlers


def build_handlers() -> Handlers:
    """The event-type -> handler table of the optimizer service (dependencies bound here)."""
    return Handlers()
