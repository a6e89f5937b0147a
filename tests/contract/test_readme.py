"""The README's settings table names every setting the code reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from slmops.cli.common import CliSettings
from slmops.settings import AuthSettings, ConsumerSettings, PlatformSettings
from slmops.stack.components import StackSettings
from slmops_console.settings import ConsoleSettings
from slmops_gateway.relay import RelaySettings
from slmops_gateway.settings import GatewaySettings
from slmops_optimizer.settings import OptimizerSettings
from slmops_registry.settings import RegistrySettings
from slmops_rollout.settings import RolloutSettings
from slmops_telemetry.settings import TelemetrySettings
from slmops_validator.settings import ValidatorSettings

README = (Path(__file__).parents[2] / "README.md").read_text()
EnvNames = Callable[..., list[str]]  # the setting_env_names fixture (conftest.py)


@pytest.mark.parametrize(
    "settings",
    [
        PlatformSettings,
        AuthSettings,
        ConsumerSettings,
        StackSettings,
        RegistrySettings,
        OptimizerSettings,
        ValidatorSettings,
        RolloutSettings,
        GatewaySettings,
        RelaySettings,
        ConsoleSettings,
        TelemetrySettings,
        CliSettings,
    ],
)
def test_every_platform_setting_is_documented(
    settings: type[BaseSettings], setting_env_names: EnvNames
) -> None:
    names = setting_env_names(settings, own_only=True)

    missing = [name for name in names if f"`{name}`" not in README]

    assert names
    assert missing == []


def test_readme_keeps_the_two_commands() -> None:
    assert "make run" in README
    assert "make test" in README
