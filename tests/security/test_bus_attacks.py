"""Attacks on the bus with real credentials: each must be refused by nats-server and change
nothing (checked as the admin). The positive controls show the same principal can do what it
is meant to, so a refusal is the permission at work, not a broken connection."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import httpx
import nats.errors
import nkeys
import pytest
from nats.js.api import ConsumerConfig

from slmops.bus.credentials import NatsCredentials
from slmops.stack.identities import enroll_gateway
from slmops.testing.attacks import connect_once_enrolled, local_user
from slmops.testing.localstack import RunningStack

GATEWAY_ID = "local-gw-1"
GATEWAY = f"gateway-{GATEWAY_ID}"
DESIRED = "slmops-desired-state"


async def _count(admin: Any, stream: str) -> int:
    info = await admin.client.jetstream(timeout=5).stream_info(stream)
    return int(info.state.messages)


@pytest.mark.parametrize(
    ("who", "subject", "stream"),
    [
        (GATEWAY, f"slmops.gateway.assignment.v1.{GATEWAY_ID}", "SLMOPS_ROLLOUT"),
        (GATEWAY, "slmops.release.created.v1", "SLMOPS_PIPELINE"),
        (GATEWAY, "slmops.gateway.report.v1.applied.another-gw", "SLMOPS_FLEET"),
        (GATEWAY, "slmops.rollout.started.v1", "SLMOPS_ROLLOUT"),
        (GATEWAY, f"$KV.{DESIRED}.{GATEWAY_ID}", f"KV_{DESIRED}"),
        ("simulator", "slmops.gateway.assignment.v1.sim-1", "SLMOPS_ROLLOUT"),
        ("service-validator", "slmops.gateway.assignment.v1.any-gw", "SLMOPS_ROLLOUT"),
        ("service-validator", "slmops.model.published.v1", "SLMOPS_PIPELINE"),
        ("service-optimizer", "slmops.validation.passed.v1", "SLMOPS_PIPELINE"),
        ("service-rollout", "slmops.release.created.v1", "SLMOPS_PIPELINE"),
        ("service-optimizer", f"$KV.{DESIRED}.any-gw", f"KV_{DESIRED}"),
        ("service-console", "slmops.rollout.paused.v1", "SLMOPS_ROLLOUT"),
        ("service-console", "slmops.gateway.report.v1.applied.any-gw", "SLMOPS_FLEET"),
        ("service-console", f"$KV.{DESIRED}.any-gw", f"KV_{DESIRED}"),
        # Field findings start re-optimizations: only the telemetry service publishes them,
        # and it publishes nothing else (no report in a gateway's name, no desired state).
        (GATEWAY, "slmops.fleet.regression.detected.v1.x86-avx512-vnni", "SLMOPS_PIPELINE"),
        ("simulator", "slmops.fleet.drift.detected.v1.x86-avx512-vnni", "SLMOPS_PIPELINE"),
        ("service-telemetry", "slmops.release.created.v1", "SLMOPS_PIPELINE"),
        ("service-telemetry", "slmops.gateway.report.v1.health.any-gw", "SLMOPS_FLEET"),
        ("service-telemetry", f"$KV.{DESIRED}.any-gw", f"KV_{DESIRED}"),
    ],
)
async def test_publishing_what_is_not_yours_is_refused(
    connect: Any, who: str, subject: str, stream: str
) -> None:
    attacker, admin = await connect(who), await connect("admin")
    before = await _count(admin, stream)
    error = await attacker.refused(attacker.client.jetstream(timeout=1).publish(subject, b"{}"))
    assert f'publish to "{subject.lower()}"' in error
    assert await _count(admin, stream) == before


async def test_a_gateway_publishes_its_own_reports(connect: Any) -> None:
    gateway, admin = await connect(GATEWAY), await connect("admin")
    before = await _count(admin, "SLMOPS_FLEET")
    ack = await gateway.client.jetstream(timeout=5).publish(
        f"slmops.gateway.report.v1.health.{GATEWAY_ID}", b"{}"
    )
    assert ack.stream == "SLMOPS_FLEET"
    assert await _count(admin, "SLMOPS_FLEET") == before + 1


@pytest.mark.parametrize("who", [GATEWAY, "simulator", "service-registry", "service-rollout"])
@pytest.mark.parametrize("action", ["delete", "purge"])
async def test_only_the_admin_deletes_or_purges_streams(
    connect: Any, who: str, action: str
) -> None:
    attacker, admin = await connect(who), await connect("admin")
    js = attacker.client.jetstream(timeout=1)
    attempt = (
        js.delete_stream("SLMOPS_FLEET") if action == "delete" else js.purge_stream("SLMOPS_FLEET")
    )
    await admin.client.jetstream(timeout=5).publish(
        f"slmops.gateway.report.v1.health.{GATEWAY_ID}", b"{}"
    )
    before = await _count(admin, "SLMOPS_FLEET")
    error = await attacker.refused(attempt)
    assert f"$js.api.stream.{action}.slmops_fleet" in error
    assert await _count(admin, "SLMOPS_FLEET") == before > 0


async def test_a_gateway_reads_its_own_desired_state_and_no_other(connect: Any) -> None:
    admin, gateway = await connect("admin"), await connect(GATEWAY)
    desired = await admin.client.jetstream(timeout=5).key_value(DESIRED)
    await desired.put(GATEWAY_ID, b'{"mine": true}')
    await desired.put("another-gw", b'{"secret": true}')
    own = await gateway.client.jetstream(timeout=5).key_value(DESIRED)
    assert (await own.get(GATEWAY_ID)).value == b'{"mine": true}'
    error = await gateway.refused(own.get("another-gw"))
    assert f"$kv.{DESIRED}.another-gw" in error


async def test_a_gateway_consumes_only_its_own_assignments(connect: Any) -> None:
    gateway = await connect(GATEWAY)
    js = gateway.client.jetstream(timeout=1)
    durable = f"{GATEWAY}-rollout"
    own = ConsumerConfig(
        name=durable, durable_name=durable,
        filter_subject=f"slmops.gateway.assignment.v1.{GATEWAY_ID}",
    )  # fmt: skip
    assert (await gateway.client.jetstream(timeout=5).add_consumer("SLMOPS_ROLLOUT", own)).name
    everyone = ConsumerConfig(name=durable, durable_name=durable,
                              filter_subject="slmops.gateway.assignment.v1.>")  # fmt: skip
    error = await gateway.refused(js.add_consumer("SLMOPS_ROLLOUT", everyone))
    assert "consumer.create.slmops_rollout" in error
    # Pulling from a service's consumer would steal its events.
    error = await gateway.refused(
        gateway.client.request("$JS.API.CONSUMER.MSG.NEXT.SLMOPS_FLEET.rollout-fleet", b"1")
    )
    assert "msg.next.slmops_fleet.rollout-fleet" in error


@pytest.mark.parametrize("subject", ["slmops.>", "_INBOX.>", ">"])
async def test_a_gateway_cannot_listen_to_other_traffic(connect: Any, subject: str) -> None:
    gateway = await connect(GATEWAY)
    error = await gateway.refused(gateway.client.subscribe(subject))
    assert f'subscription to "{subject.lower()}"' in error


@pytest.mark.parametrize(
    "subject",
    ["slmops.gateway.assignment.v1.>", "slmops.gateway.report.v1.health.>", "$KV.>",
     "_INBOX.>", "slmops.>"],
)  # fmt: skip
async def test_the_console_listens_to_rollouts_and_nothing_else(connect: Any, subject: str) -> None:
    console = await connect("service-console")
    await console.client.subscribe("slmops.rollout.>")
    await console.client.subscribe("slmops.gateway.report.v1.applied.>")
    await console.client.flush(timeout=5)

    error = await console.refused(console.client.subscribe(subject))

    assert f'subscription to "{subject.lower()}"' in error
    assert not [e for e in console.errors if "rollout" in e or "applied" in e]


async def test_anonymous_clients_are_refused(connect: Any) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(None, reconnect=False)


async def test_an_unknown_key_is_refused(connect: Any) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(NatsCredentials(seed), reconnect=False)


async def test_an_enrolled_gateway_works_at_once_and_a_revoked_one_is_cut_off(
    stack: RunningStack, connect: Any
) -> None:
    enrolled = enroll_gateway(stack.var_dir, "gw-stolen", "x86-avx2")
    stolen = local_user(stack.var_dir, "gateway-gw-stolen")  # what a thief copied
    token = enrolled.token_file.read_text().strip()
    gateway = await connect_once_enrolled(connect, stolen)
    await gateway.client.jetstream(timeout=5).publish(
        "slmops.gateway.report.v1.health.gw-stolen", b"{}"
    )
    keys = f"{stack.urls['registry']}/v1/keys"  # a route a gateway may call
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    assert (await http.get(keys)).status_code == 200
    revoked = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "slmops.cli.main", "auth", "revoke",
                         "gateway:gw-stolen"], env=stack.env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert revoked.returncode == 0, revoked.stderr
    assert "disconnected" in revoked.stdout
    for _ in range(600):  # within a minute (it takes milliseconds)
        if gateway.disconnects:
            break
        await asyncio.sleep(0.1)
    assert gateway.disconnects >= 1
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(stolen, reconnect=False)
    denied = await http.get(keys)
    await http.aclose()
    assert denied.status_code == 401
    assert "revoked" in denied.text
