"""What the local stack runs: the component list and the readiness probes (its settings and
component types are :mod:`slmops.stack.specs`, re-exported here).

Nothing here starts a process; :mod:`slmops.stack.launcher` does, from the
:class:`ComponentSpec` list :func:`plan_stack` builds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from slmops.auth.bususers import local_bus_users
from slmops.auth.local import LOCAL_GATEWAY_ID, local_credentials
from slmops.settings import PlatformSettings
from slmops.stack.natscluster import jetstream_replicas, plan_nats_cluster, stack_platform
from slmops.stack.specs import (
    LOCAL_HOST,
    ComponentKind,
    ComponentSpec,
    PortClaim,
    StackError,
    StackSettings,
    stack_executable,
)
from slmops.trust.local import pinned_root_file

__all__ = [
    "LOCAL_HOST",
    "ComponentKind",
    "ComponentSpec",
    "PortClaim",
    "Probe",
    "StackError",
    "StackSettings",
    "discover_services",
    "jetstream_replicas",
    "plan_stack",
    "probe",
    "service_env_prefix",
    "service_module",
    "stack_platform",
]

#: Entry point group each service distribution registers its name in.
SERVICE_ENTRY_POINT_GROUP = "slmops.services"
#: Start order of the known services; other installed services follow, alphabetically.
SERVICE_ORDER = (
    "registry", "optimizer", "validator", "rollout", "gateway", "console", "telemetry",
)  # fmt: skip


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
                stack_executable("nats-server"),
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
        nats_specs = plan_nats_cluster(stack, var_dir)
        nats_url = nats_specs[0].urls["cluster"]
    specs = [
        *nats_specs,
        ComponentSpec(
            name="s3",
            kind=ComponentKind.S3,
            argv=(
                stack_executable("nanio"),
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
