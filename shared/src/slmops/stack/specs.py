"""The stack's vocabulary: its settings, what a component is, and the error users see.

:mod:`slmops.stack.components` plans the components from these; nothing here starts anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from slmops.stack.binaries import venv_binary

#: Every local stack component binds this address and nothing else.
LOCAL_HOST = "127.0.0.1"


class StackError(Exception):
    """A problem `slmops up/down/status` reports to the user (one message, non-zero exit)."""


class StackSettings(BaseSettings):
    """Ports and timeouts of the local stack. Env prefix ``SLMOPS_STACK_``."""

    model_config = SettingsConfigDict(env_prefix="SLMOPS_STACK_", extra="ignore")

    nats_port: int = Field(4222, ge=1, le=65535, description="NATS client port on 127.0.0.1.")
    nats_monitor_port: int = Field(
        8222, ge=1, le=65535, description="NATS HTTP monitoring port (healthz) on 127.0.0.1."
    )
    nats_cluster_size: int = Field(
        1,
        ge=1,
        le=5,
        description="NATS servers: 1 (one node) or a JetStream cluster of this many nodes "
        "(`slmops up --nats-cluster 3`); node i (0-based) listens on nats_port + i, "
        "nats_monitor_port + i and nats_cluster_port + i, and stores under <var_dir>/nats-<i+1>.",
    )
    nats_cluster_port: int = Field(
        6222, ge=1, le=65535, description="Route port of the first NATS cluster node."
    )
    s3_port: int = Field(9000, ge=1, le=65535, description="Local S3 server port on 127.0.0.1.")
    service_base_port: int = Field(
        8101,
        ge=1,
        le=65535,
        description="HTTP port of the first service; the i-th service (0-based, in start "
        "order) gets service_base_port + i.",
    )
    ready_timeout_s: float = Field(
        120.0,
        gt=0,
        description="How long each component may take to become ready, in seconds (the "
        "optimizer starts Ray Serve in-process: ~20 s on 2 cores).",
    )
    stop_timeout_s: float = Field(
        25.0,
        gt=0,
        description="After SIGTERM, how long a component may take to exit before SIGKILL, in "
        "seconds (above the services' consumer drain timeout, 20 s by default).",
    )
    restart_backoff_initial_s: float = Field(
        1.0,
        gt=0,
        description="A component that exits is started again after this many seconds; the "
        "wait doubles with each further exit, up to restart_backoff_max_s.",
    )
    restart_backoff_max_s: float = Field(
        30.0, gt=0, description="The longest wait before starting an exited component again."
    )
    restart_reset_after_s: float = Field(
        60.0,
        gt=0,
        description="Once a restarted component has been ready this many seconds, its next "
        "exit waits restart_backoff_initial_s again.",
    )
    services: str | None = Field(
        None,
        description="Comma separated services to start; empty string = none (only NATS and "
        "S3); unset = every installed service.",
    )

    def selected_services(self, installed: list[str]) -> list[str]:
        """The services to start, in start order; unknown names raise :class:`StackError`."""
        if self.services is None:
            return installed
        wanted = {name.strip() for name in self.services.split(",") if name.strip()}
        unknown = sorted(wanted - set(installed))
        if unknown:
            raise StackError(
                f"SLMOPS_STACK_SERVICES names services that are not installed: "
                f"{', '.join(unknown)} (installed: {', '.join(installed) or 'none'})"
            )
        return [name for name in installed if name in wanted]


class ComponentKind(StrEnum):
    """What a component is; decides its readiness probe and its stop group."""

    NATS = "nats"
    S3 = "s3"
    SERVICE = "service"


@dataclass(frozen=True)
class PortClaim:
    """One port a component listens on, and how the user changes it."""

    port: int
    purpose: str
    env_var: str


@dataclass(frozen=True)
class ComponentSpec:
    """One process of the stack: how to start it and how to tell it is ready."""

    name: str
    kind: ComponentKind
    argv: tuple[str, ...]
    ports: tuple[PortClaim, ...]
    #: Where it listens, by role (``nats``, ``monitor``, ``s3``, ``http``, ``docs``).
    urls: Mapping[str, str]
    #: The URL :func:`probe` requests.
    ready_url: str
    #: Environment on top of the parent's.
    env: Mapping[str, str] = field(default_factory=dict)
    #: Files (re)written, mode 0600, before each start: a cluster node's configuration.
    files: Mapping[Path, str] = field(default_factory=dict)


def stack_executable(name: str) -> str:
    """The path of binary ``name`` (from the venv, else PATH); a :class:`StackError` if absent."""
    try:
        return str(venv_binary(name))
    except FileNotFoundError as exc:
        raise StackError(str(exc)) from exc
