"""Optimization passes, registered by name (the names device profiles use in their recipes)."""

from __future__ import annotations

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
    _load_builtin()
    return sorted(_REGISTRY)


def create_pass(name: str, config: dict[str, object]) -> Pass[Any]:
    """An instance of the pass ``name``; unknown names and bad configs raise PassError."""
    _load_builtin()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise PassError(f"unknown pass {name!r}; known passes: {', '.join(sorted(_REGISTRY))}")
    return cls.from_config(config)


def _load_builtin() -> None:
    # Importing the modules registers them; they keep their heavy imports inside run().
    from slmops_optimizer.passes import (  # noqa: F401
        convert,
        fp16,
        gguf_blocks,
        graph_optimize,
        int8_dynamic,
        int8_static,
        prune,
        weight_only,
    )


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
    "pass_names",
    "register",
]
