"""The README's settings table names every setting the code reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from slmops.cli.registry import CliSettings
from slmops.settings import ConsumerSettings, PlatformSettings, ServiceSettings
from slmops.stack.components import StackSettings
from slmops_gateway.settings import GatewaySettings
from slmops_optimizer.settings import OptimizerSettings
from slmops_registry.settings import RegistrySettings
from slmops_rollout.settings import RolloutSettings
from slmops_validator.settings import ValidatorSettings

README = (Path(__file__).parents[2] / "README.md").read_text()


@pytest.mark.parametrize(
    "settings",
    [
        PlatformSettings,
        ConsumerSettings,
        StackSettings,
        RegistrySettings,
        OptimizerSettings,
        ValidatorSettings,
        RolloutSettings,
        GatewaySettings,
        CliSettings,
    ],
)
def test_every_platform_setting_is_documented(settings: type[BaseSettings]) -> None:
    prefix = settings.model_config["env_prefix"]

    inherited = (
        set(ServiceSettings.model_fields) if issubclass(settings, ServiceSettings) else set()
    )
    missing = [
        f"{prefix}{name.upper()}"
        for name in settings.model_fields
        if name not in inherited and f"`{prefix}{name.upper()}`" not in README
    ]

    assert missing == []


def test_readme_keeps_the_two_commands() -> None:
    assert "make run" in README
    assert "make test" in README
