"""Optimization passes, registered by name (the names device profiles use in their recipes).

A pass is a module of this package whose class is decorated with :func:`register`: every module
here is imported when the registry is first used, so a new pass needs no list to be added to.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from slmops_optimizer.passes.base import (
    JobCancelled,
    OnnxModel,
    Pass,
    PassConfig,
    PassContext,
    PassError,
    Refinement,
    SourceModel,
)

_REGISTRY: dict[str, type[Pass[Any]]] = {}


def register(cls: type[Pass[Any]]) -> type[Pass[Any]]:
    """Class decorator: make a pass available to recipes under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a pass named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def pass_names() -> list[str]:
    load_pass_modules()
    return sorted(_REGISTRY)


def create_pass(name: str, config: dict[str, object]) -> Pass[Any]:
    """An instance of the pass ``name``; unknown names and bad configs raise PassError."""
    load_pass_modules()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise PassError(f"unknown pass {name!r}; known passes: {', '.join(sorted(_REGISTRY))}")
    return cls.from_config(config)


def load_pass_modules(package: str = __name__) -> list[str]:
    """Import every module of ``package`` (this one by default): importing a pass module
    registers its passes. Cheap after the first time (modules are imported once); the modules
    keep their heavy imports (onnx, onnxruntime, torch) inside ``run``. Returns the modules."""
    found = importlib.import_module(package)
    names = [f"{package}.{m.name}" for m in pkgutil.iter_modules(found.__path__)]
    for name in names:
        importlib.import_module(name)
    return names


__all__ = [
    "JobCancelled",
    "OnnxModel",
    "Pass",
    "PassConfig",
    "PassContext",
    "PassError",
    "Refinement",
    "SourceModel",
    "create_pass",
    "load_pass_modules",
    "pass_names",
    "register",
]
