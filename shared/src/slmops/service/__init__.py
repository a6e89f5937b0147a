"""The runtime and HTTP plumbing every slmops service shares."""

from slmops.service.http import create_service_app, health_router, serve
from slmops.service.runtime import BackgroundTask, Check, Dependency, Readiness, ServiceRuntime

__all__ = [
    "BackgroundTask",
    "Check",
    "Dependency",
    "Readiness",
    "ServiceRuntime",
    "create_service_app",
    "health_router",
    "serve",
]
