"""What several contract tests need: which env vars the settings classes read.

Fixtures rather than a module to import: with ``--import-mode=importlib`` test modules cannot
import one another.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
from pydantic_settings import BaseSettings

from slmops.settings import ServiceSettings
from slmops.stack.components import discover_services, service_env_prefix, service_module

EnvNames = Callable[..., list[str]]


def env_names(settings: type[BaseSettings], *, own_only: bool = False) -> list[str]:
    """The env vars ``settings`` reads: its env prefix + each field name, upper-cased.

    Nested settings (a service's ``platform`` and ``consumer``) are left out: they read their
    own prefix. ``own_only`` also leaves out the fields every service inherits.
    """
    prefix = settings.model_config.get("env_prefix", "")
    inherited = ServiceSettings.model_fields if issubclass(settings, ServiceSettings) else {}
    return [
        f"{prefix}{name.upper()}"
        for name, field in settings.model_fields.items()
        if not (own_only and name in inherited)
        and not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseSettings))
    ]


@pytest.fixture(scope="session")
def setting_env_names() -> EnvNames:
    return env_names


@pytest.fixture(scope="session")
def service_settings() -> dict[str, type[ServiceSettings]]:
    """Each installed service's settings class: the ServiceSettings subclass in
    ``slmops_<name>.settings`` whose env prefix is ``SLMOPS_<NAME>_``."""
    found: dict[str, type[ServiceSettings]] = {}
    for name in discover_services():
        module = importlib.import_module(f"{service_module(name)}.settings")
        classes = [
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, ServiceSettings)
            and value.model_config.get("env_prefix") == service_env_prefix(name)
        ]
        assert len(classes) == 1, f"{module.__name__}: expected one settings class, {classes}"
        found[name] = classes[0]
    return found
