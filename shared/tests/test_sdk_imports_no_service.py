"""The SDK never imports a service: every module under shared/src/slmops, read with ast, has no
``import slmops_<service>`` (at any depth, inside functions too) and no ``import_module`` /
``__import__`` of a literal ``slmops_...`` name. Services plug in through entry points."""

from __future__ import annotations

import ast
from pathlib import Path

import slmops

SDK = Path(slmops.__file__).parent
SERVICE_PREFIX = "slmops_"


def service_imports(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, module) of each import of a ``slmops_*`` module in ``source``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if called in ("import_module", "__import__") and isinstance(first, ast.Constant):
                names = [str(first.value)]
        found += [(node.lineno, n) for n in names if n.split(".")[0].startswith(SERVICE_PREFIX)]
    return found


def test_no_sdk_module_imports_a_service() -> None:
    modules = sorted(SDK.rglob("*.py"))
    offenders = [
        f"{path.relative_to(SDK.parent)}:{line}: {name}"
        for path in modules
        for line, name in service_imports(path.read_text(), str(path))
    ]

    assert len(modules) > 50  # the whole SDK was read
    assert offenders == []


def test_the_scan_sees_imports_inside_functions_and_by_name() -> None:
    source = """
import json
from slmops.bus import Bus

def later():
    from slmops_gateway.simulator import FleetSpec
    import slmops_registry.app as registry
    return importlib.import_module("slmops_rollout.engine"), __import__("slmops_validator")
"""

    found = [name for _, name in service_imports(source, "example.py")]

    assert found == [
        "slmops_gateway.simulator", "slmops_registry.app", "slmops_rollout.engine",
        "slmops_validator",
    ]  # fmt: skip
