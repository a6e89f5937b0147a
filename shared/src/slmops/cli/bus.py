"""``slmops bus``: what only the bus's admin does - declare the streams and buckets."""

from __future__ import annotations

import asyncio

import typer

from slmops.bus.connection import declare_topology
from slmops.bus.credentials import BadNatsCredentialsError, NatsCredentials
from slmops.bus.topology import Topology
from slmops.cli.common import console_out, fail
from slmops.settings import PlatformSettings

app = typer.Typer(help="The bus: streams and buckets (admin).", no_args_is_help=True)


@app.command("declare")
def declare() -> None:
    """Create or update every stream and KV bucket, with the bounds and replicas the settings
    give (SLMOPS_JETSTREAM_REPLICAS, SLMOPS_STREAM_MAX_GB), as the admin
    (SLMOPS_NATS_NKEY_FILE): the services' identities may only find them. `slmops up` does
    this itself; a deployment runs it once per release (a Job, a one-shot container)."""
    platform = PlatformSettings()
    try:
        credentials = NatsCredentials.from_settings(platform, "admin")
    except BadNatsCredentialsError as exc:
        fail(str(exc))
    topology = Topology().sized(platform.jetstream_replicas, platform.stream_max_gb)
    try:
        asyncio.run(declare_topology(platform.nats_url, topology, credentials))
    except Exception as exc:
        fail(f"could not declare the topology on {platform.nats_url}: {exc}")
    names = [s.name for s in topology.streams] + [b.bucket for b in topology.kv_buckets]
    console_out.print(f"declared {len(names)}: {', '.join(names)}", markup=False)
