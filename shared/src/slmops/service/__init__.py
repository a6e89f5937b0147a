"""The runtime and HTTP plumbing every slmops service shares."""

from slmops.service.http import create_service_app, health_router, serve
from slmops.service.runtime import Check, Dependency, Readiness, ServiceRuntime

__all__ = [
    "Check",
    "Dependency",
    "Readiness",
    "ServiceRuntime",
    "create_service_app",
    "health_router",
    "serve",
]
