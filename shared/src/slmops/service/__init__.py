"""The runtime and HTTP plumbing every slmops service shares."""

from slmops.service.http import create_service_app, health_router, serve
from slmops.service.runtime import Check, Readiness, ServiceRuntime

__all__ = ["Check", "Readiness", "ServiceRuntime", "create_service_app", "health_router", "serve"]
