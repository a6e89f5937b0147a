"""A NATS JetStream cluster on one host: each node's configuration file, routes on loopback.

Used by `slmops up --nats-cluster 3` (:func:`plan_nats_cluster`: one stack component per node)
and by the test helper :class:`slmops.testing.natscluster.NatsCluster`. Each node is a
``nats-server -c <node.conf>`` with its own client, cluster (route) and monitoring port and its
own JetStream store; the
routes between the nodes authenticate with a password shared by the nodes only, so a local
process cannot join the cluster as a "server" and read every subject past the users'
permissions. The password lives in the configuration files (mode 0600), never in an argv
that ``ps`` shows. The users (``auth.conf`` of :mod:`slmops.auth.bususers``) are included
by every node, so each process connects to any node with its own credentials.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from slmops.auth.bususers import local_bus_users
from slmops.settings import PlatformSettings
from slmops.stack.specs import (
    LOCAL_HOST,
    ComponentKind,
    ComponentSpec,
    PortClaim,
    StackError,
    StackSettings,
    stack_executable,
)

#: What every node of a local cluster calls the cluster (`/jsz` shows it).
CLUSTER_NAME = "slmops"
#: The user the nodes' routes authenticate as (cluster authorization allows one user only).
ROUTE_USER = "route"
_HEADER = "# written by slmops (slmops.stack.natscluster); edits are overwritten"


@dataclass(frozen=True)
class NatsNode:
    """One node: its ports on 127.0.0.1 and its JetStream store."""

    index: int  # 0-based position in the cluster
    client_port: int
    cluster_port: int
    monitor_port: int
    store_dir: Path

    @property
    def name(self) -> str:
        """``nats-1``, ``nats-2``...: its ``server_name`` and stack component name."""
        return f"nats-{self.index + 1}"

    @property
    def url(self) -> str:
        return f"nats://{LOCAL_HOST}:{self.client_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{LOCAL_HOST}:{self.monitor_port}"

    @property
    def route_url(self) -> str:
        return f"nats-route://{LOCAL_HOST}:{self.cluster_port}"


def cluster_nodes(
    size: int, client_port: int, cluster_port: int, monitor_port: int, store_root: Path
) -> list[NatsNode]:
    """``size`` nodes on consecutive ports from each base; node i stores under
    ``store_root/nats-<i+1>``."""
    return [
        NatsNode(i, client_port + i, cluster_port + i, monitor_port + i,
                 store_root / f"nats-{i + 1}")
        for i in range(size)
    ]  # fmt: skip


def client_urls(nodes: list[NatsNode]) -> str:
    """Every node's client URL, comma separated: ``SLMOPS_NATS_URL`` of a cluster."""
    return ",".join(node.url for node in nodes)


def new_route_password() -> str:
    return secrets.token_urlsafe(24)


def render_node_config(
    node: NatsNode,
    nodes: list[NatsNode],
    route_password: str,
    config_path: Path,
    auth_config: Path | None = None,
) -> str:
    """``node``'s configuration file (to be written at ``config_path``): JetStream on, routes
    to every other node, ``auth_config`` included (nats-server resolves includes relative to
    the including file, hence the relative path)."""
    routes = [
        f"nats-route://{ROUTE_USER}:{route_password}@{LOCAL_HOST}:{peer.cluster_port}"
        for peer in nodes
        if peer.index != node.index
    ]
    lines = [
        _HEADER,
        f"server_name: {json.dumps(node.name)}",
        f"listen: {json.dumps(f'{LOCAL_HOST}:{node.client_port}')}",
        f"http: {json.dumps(f'{LOCAL_HOST}:{node.monitor_port}')}",
        f"jetstream {{ store_dir: {json.dumps(str(node.store_dir.resolve()))} }}",
        "cluster {",
        f"  name: {json.dumps(CLUSTER_NAME)}",
        f"  listen: {json.dumps(f'{LOCAL_HOST}:{node.cluster_port}')}",
        f"  authorization {{ user: {json.dumps(ROUTE_USER)}, "
        f"password: {json.dumps(route_password)} }}",
        f"  routes: {json.dumps(routes)}",
        "}",
    ]
    if auth_config is not None:
        relative = os.path.relpath(auth_config.resolve(), config_path.resolve().parent)
        lines.append(f"include {json.dumps(relative)}")
    return "\n".join(lines)


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


def plan_nats_cluster(stack: StackSettings, var_dir: Path) -> list[ComponentSpec]:
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
            argv=(stack_executable("nats-server"), "-c", str(config)),
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
