"""The CLI's modules share one common module and keep their private helpers to themselves;
the fleet simulator comes from the gateway distribution through an entry point."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

from slmops import cli, fleetsim
from slmops.fleetsim import FleetSimulatorMissingError, load_fleet_simulator

CLI = Path(cli.__file__).parent


def test_no_cli_module_imports_another_modules_private_names() -> None:
    private = []
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slmops"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_")]  # fmt: skip

    assert private == []


def test_the_fleet_simulator_is_the_gateway_distributions() -> None:
    simulator = load_fleet_simulator()

    assert simulator.__module__ == "slmops_gateway.fleetsim"


def test_without_a_gateway_installed_the_fleet_commands_say_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
        assert group == fleetsim.FLEET_SIMULATOR_ENTRY_POINT_GROUP
        return []

    monkeypatch.setattr(fleetsim.importlib.metadata, "entry_points", entry_points)

    with pytest.raises(FleetSimulatorMissingError, match="make install"):
        load_fleet_simulator()
