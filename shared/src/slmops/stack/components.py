"""What the local stack runs: its settings, the component list and the readiness probes.

Nothing here starts a process; :mod:`slmops.stack.launcher` does, from the
:class:`ComponentSpec` list :func:`plan_stack` builds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from slmops.auth.bususers import local_bus_users
from slmops.auth.local import LOCAL_GATEWAY_ID, local_credentials
from slmops.settings import PlatformSettings
from slmops.stack.binaries import venv_binary
from slmops.stack.natscluster import (
    client_urls,
    cluster_nodes,
    new_route_password,
    render_node_config,
)
from slmops.trust.local import pinned_root_file

#: Every local stack component binds this address and nothing else.
LOCAL_HOST = "127.0.0.1"
#: Entry point group each service distribution registers its name in.
SERVICE_ENTRY_POINT_GROUP = "slmops.services"
#: Start order of the known services; other installed services follow, alphabetically.
SERVICE_ORDER = (
    "registry", "optimizer", "validator", "rollout", "gateway", "console", "telemetry",
)  # fmt: skip


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


def discover_services() -> list[str]:
    """Names of the installed services (entry point group ``slmops.services``), in start order."""
    names = {ep.name for ep in importlib.metadata.entry_points(group=SERVICE_ENTRY_POINT_GROUP)}
    known = [name for name in SERVICE_ORDER if name in names]
    return known + sorted(names - set(SERVICE_ORDER))


def service_module(name: str) -> str:
    """The importable package of service ``name`` (``slmops_<name>``)."""
    return f"slmops_{name.replace('-', '_')}"


def service_env_prefix(name: str) -> str:
    """The env prefix of service ``name``'s settings (``SLMOPS_<NAME>_``)."""
    return f"SLMOPS_{name.replace('-', '_').upper()}_"


def _executable(name: str) -> str:
    try:
        return str(venv_binary(name))
    except FileNotFoundError as exc:
        raise StackError(str(exc)) from exc


def _check_runnable(name: str) -> None:
    module = f"{service_module(name)}.__main__"
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError as exc:
        raise StackError(f"service {name!r} cannot be imported: {exc}") from exc
    if not found:
        raise StackError(
            f"service {name!r} is installed but has no {module} module to run; "
            f"leave it out with SLMOPS_STACK_SERVICES"
        )


def jetstream_replicas(stack: StackSettings, platform: PlatformSettings) -> int:
    """Replicas of every stream and bucket: SLMOPS_JETSTREAM_REPLICAS if set, else 3 on a
    cluster (its size, if smaller) and 1 on one node."""
    if stack.nats_cluster_size > 1 and "jetstream_replicas" not in platform.model_fields_set:
        return min(3, stack.nats_cluster_size)
    return platform.jetstream_replicas


def stack_platform(stack: StackSettings, platform: PlatformSettings) -> PlatformSettings:
    """``platform`` with the replicas this stack's NATS gets (see :func:`jetstream_replicas`)."""
    replicas = jetstream_replicas(stack, platform)
    if replicas > stack.nats_cluster_size:
        raise StackError(
            f"SLMOPS_JETSTREAM_REPLICAS={replicas} needs at least {replicas} NATS servers, "
            f"but the stack runs {stack.nats_cluster_size}: `slmops up --nats-cluster 3`"
        )
    if replicas == platform.jetstream_replicas:
        return platform
    return platform.model_copy(update={"jetstream_replicas": replicas})


def _plan_nats_cluster(stack: StackSettings, var_dir: Path) -> list[ComponentSpec]:
    """One component per node (``nats-1``...), each reachable at every node's URL."""
    nodes = cluster_nodes(stack.nats_cluster_size, stack.nats_port, stack.nats_cluster_port,
                          stack.nats_monitor_port, store_root=var_dir)  # fmt: skip
    users, password = local_bus_users(var_dir), new_route_password()
    specs = []
    for node in nodes:
        config = users.root / "cluster" / f"{node.name}.conf"
        text = render_node_config(node, nodes, password, config, users.config_file)
        where = f"of NATS node {node.name} (base + {node.index})"
        specs.append(ComponentSpec(
            name=node.name,
            kind=ComponentKind.NATS,
            argv=(_executable("nats-server"), "-c", str(config)),
            ports=(
                PortClaim(node.client_port, f"client port {where}", "SLMOPS_STACK_NATS_PORT"),
                PortClaim(node.cluster_port, f"route port {where}",
                          "SLMOPS_STACK_NATS_CLUSTER_PORT"),
                PortClaim(node.monitor_port, f"monitoring port {where}",
                          "SLMOPS_STACK_NATS_MONITOR_PORT"),
            ),
            urls={"nats": node.url, "monitor": node.monitor_url, "routes": node.route_url,
                  "cluster": client_urls(nodes)},
            # 200 once a meta leader is known and this node's streams are current: the nodes
            # start together, since one alone never gets there
            ready_url=f"{node.monitor_url}/healthz",
            files={config: text},
        ))  # fmt: skip
    return specs


def plan_stack(stack: StackSettings, platform: PlatformSettings) -> list[ComponentSpec]:
    """The components to start, in start order: NATS (one node, or ``nats-1``... of a
    cluster), S3, then the selected services."""
    platform = stack_platform(stack, platform)
    var_dir = platform.var_dir.resolve()
    nats_url = f"nats://{LOCAL_HOST}:{stack.nats_port}"
    monitor_url = f"http://{LOCAL_HOST}:{stack.nats_monitor_port}"
    s3_url = f"http://{LOCAL_HOST}:{stack.s3_port}"
    nats_specs = [
        ComponentSpec(
            name="nats",
            kind=ComponentKind.NATS,
            argv=(
                _executable("nats-server"),
                *("-a", LOCAL_HOST, "-p", str(stack.nats_port), "-js"),
                *("-sd", str(var_dir / "nats"), "-m", str(stack.nats_monitor_port)),
                # Users and their permissions (`slmops up` writes it; enrol/revoke reload it).
                *("-c", str(local_bus_users(var_dir).config_file)),
            ),
            ports=(
                PortClaim(stack.nats_port, "NATS client port", "SLMOPS_STACK_NATS_PORT"),
                PortClaim(
                    stack.nats_monitor_port,
                    "NATS monitoring port",
                    "SLMOPS_STACK_NATS_MONITOR_PORT",
                ),
            ),
            urls={"nats": nats_url, "monitor": monitor_url},
            ready_url=f"{monitor_url}/healthz?js-enabled-only=true",
        )
    ]
    if stack.nats_cluster_size > 1:
        nats_specs = _plan_nats_cluster(stack, var_dir)
        nats_url = nats_specs[0].urls["cluster"]
    specs = [
        *nats_specs,
        ComponentSpec(
            name="s3",
            kind=ComponentKind.S3,
            argv=(
                _executable("nanio"),
                *("serve", "--host", LOCAL_HOST, "--port", str(stack.s3_port)),
                *("--data-dir", str(var_dir / "s3"), "--region", platform.s3_region),
            ),
            ports=(PortClaim(stack.s3_port, "S3 port", "SLMOPS_STACK_S3_PORT"),),
            urls={"s3": s3_url},
            ready_url=f"{s3_url}/",
            env={
                "NANIO_ACCESS_KEY": platform.s3_access_key_id.get_secret_value(),
                "NANIO_SECRET_KEY": platform.s3_secret_access_key.get_secret_value(),
            },
        ),
    ]
    common_env = {
        "SLMOPS_ENV": "local",
        "SLMOPS_VAR_DIR": str(var_dir),
        "SLMOPS_TRACE_DIR": str(var_dir / "traces"),
        "SLMOPS_NATS_URL": nats_url,
        "SLMOPS_JETSTREAM_REPLICAS": str(platform.jetstream_replicas),
        "SLMOPS_S3_ENDPOINT_URL": s3_url,
        "SLMOPS_S3_ACCESS_KEY_ID": platform.s3_access_key_id.get_secret_value(),
        "SLMOPS_S3_SECRET_ACCESS_KEY": platform.s3_secret_access_key.get_secret_value(),
        "SLMOPS_S3_BUCKET": platform.s3_bucket,
        "SLMOPS_AUTH_KEYS_FILE": str(local_credentials(var_dir).keys_file),
    }
    services = stack.selected_services(discover_services())
    # Services call each other's HTTP APIs (the registry's, mostly; the console all of them):
    # each gets ``SLMOPS_<NAME>_<OTHER>_URL`` for every other service of this stack (a
    # service without such a setting ignores the variable).
    base = stack.service_base_port
    peer_urls = {
        f"{other.replace('-', '_').upper()}_URL": f"http://{LOCAL_HOST}:{base + i}"
        for i, other in enumerate(services)
    }
    for index, name in enumerate(services):
        _check_runnable(name)
        port = stack.service_base_port + index
        url = f"http://{LOCAL_HOST}:{port}"
        prefix = service_env_prefix(name)
        specs.append(
            ComponentSpec(
                name=name,
                kind=ComponentKind.SERVICE,
                argv=(sys.executable, "-m", service_module(name)),
                ports=(
                    PortClaim(
                        port,
                        f"HTTP port of service {name} (base + {index})",
                        "SLMOPS_STACK_SERVICE_BASE_PORT",
                    ),
                ),
                urls={"http": url, "docs": f"{url}/docs"},
                ready_url=f"{url}/readyz",
                env={
                    **common_env,
                    **{f"{prefix}{var}": peer for var, peer in peer_urls.items()},
                    f"{prefix}HOST": LOCAL_HOST,
                    f"{prefix}PORT": str(port),
                    **_identity_env(name, prefix, var_dir),
                },
            )
        )
    return specs


def _identity_env(name: str, prefix: str, var_dir: Path) -> dict[str, str]:
    """Each service calls the others as itself (tokens minted by ``slmops.auth.local``)."""
    creds, users = local_credentials(var_dir), local_bus_users(var_dir)
    identity = f"gateway-{LOCAL_GATEWAY_ID}" if name == "gateway" else f"service-{name}"
    env = {
        "SLMOPS_AUTH_TOKEN_FILE": str(creds.token_file(identity)),
        "SLMOPS_NATS_NKEY_FILE": str(users.seed_file(identity)),
    }
    if name in ("gateway", "validator"):  # they verify what the registry signed
        env[f"{prefix}TRUST_ROOT_FILE"] = str(pinned_root_file(var_dir))
    if name == "gateway":
        env[f"{prefix}GATEWAY_ID"] = LOCAL_GATEWAY_ID
    return env


@dataclass(frozen=True)
class Probe:
    """One readiness check: ready or not, why, and the service's JSON body if any."""

    ready: bool
    detail: str
    body: object = None


def probe(kind: ComponentKind, ready_url: str, timeout_s: float = 2.0) -> Probe:
    """Ask a component whether it is ready (never raises).

    NATS: the monitor's JetStream healthz answers 200. S3: any HTTP answer (requests without
    a signature get 403). Services: ``/readyz`` answers 200; its JSON body is kept either way.
    """
    try:
        with httpx.Client(timeout=timeout_s, trust_env=False) as client:
            response = client.get(ready_url)
    except httpx.HTTPError as exc:
        return Probe(False, f"GET {ready_url}: {type(exc).__name__}: {exc}".rstrip(": "))
    if kind is ComponentKind.S3:
        return Probe(True, f"HTTP {response.status_code}")
    body: object = None
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = response.text[:500] or None
    ready = response.status_code == 200
    detail = f"HTTP {response.status_code}"
    if not ready and body is not None:
        detail += f" {json.dumps(body) if not isinstance(body, str) else body}"
    return Probe(ready, detail, body)
