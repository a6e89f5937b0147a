"""Every route of every service's OpenAPI refuses a caller without the right credentials.

The apps are built as the services build them (no lifespan: the credentials check comes before
any handler touches NATS or S3). Health and readiness answer anyone; a gateway's inference
routes answer local callers unless its API key is set. Everything else: 401 without a valid
token, 403 with a token lacking the route's scope (a scraper's token opens only ``/metrics``,
which a viewer's does not).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from slmops.auth import ROLES as ROLE_SCOPES
from slmops.auth import LocalCredentials, Scope, TokenIssuer, scopes_of_role
from slmops.auth.tokens import generate_signing_key
from slmops.settings import PlatformSettings

PUBLIC = {"/healthz", "/readyz"}
METRICS = "/metrics"  # the one route a scraper's token opens
GATEWAY_INFERENCE = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
                     "/v1/infer"}  # fmt: skip


def build_app(service: str, var_dir: Path, **overrides: Any) -> FastAPI:
    platform = PlatformSettings(var_dir=var_dir)
    if service == "registry":
        from slmops_registry.app import create_app as registry
        from slmops_registry.settings import RegistrySettings

        return registry(RegistrySettings(platform=platform))
    if service == "optimizer":
        from slmops_optimizer.app import create_app as optimizer
        from slmops_optimizer.settings import OptimizerSettings

        return optimizer(OptimizerSettings(platform=platform, ray_mode="local-testing"))
    if service == "validator":
        from slmops_validator.app import create_app as validator
        from slmops_validator.settings import ValidatorSettings

        return validator(ValidatorSettings(platform=platform))
    if service == "rollout":
        from slmops_rollout.app import create_app as rollout
        from slmops_rollout.settings import RolloutSettings

        return rollout(RolloutSettings(platform=platform))
    if service == "console":  # its pages are out of the OpenAPI: test_console_auth.py
        from slmops_console.app import create_app as console
        from slmops_console.settings import ConsoleSettings

        return console(ConsoleSettings(platform=platform))
    if service == "telemetry":
        from slmops_telemetry.app import create_app as telemetry
        from slmops_telemetry.settings import TelemetrySettings

        return telemetry(TelemetrySettings(platform=platform))
    from slmops_gateway.app import create_app as gateway
    from slmops_gateway.settings import GatewaySettings

    return gateway(GatewaySettings(platform=platform, **overrides))


SERVICES = ("registry", "optimizer", "validator", "rollout", "gateway", "console", "telemetry")


def operations(app: FastAPI) -> Iterator[tuple[str, str]]:
    """(method, concrete path) of every operation in the app's OpenAPI document."""
    for path, item in app.openapi()["paths"].items():
        concrete = path
        for name in [p["name"] for op in item.values() for p in op.get("parameters", [])
                     if p["in"] == "path"]:  # fmt: skip
            concrete = concrete.replace("{" + name + "}", "x1")
        for method in item:
            yield method.upper(), concrete


def call(client: TestClient, method: str, path: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.request(method, path, headers=headers, json={})


@pytest.fixture
def var_dir(credentials: LocalCredentials) -> Path:
    return credentials.root.parent


@pytest.mark.parametrize("service", SERVICES)
def test_every_route_refuses_anonymous_and_forged_callers(
    service: str, var_dir: Path, credentials: LocalCredentials
) -> None:
    app = build_app(service, var_dir)
    routes = list(operations(app))
    assert len(routes) >= 4, routes
    assert ("GET", METRICS) in routes
    stranger = TokenIssuer(generate_signing_key())  # a key the services never trusted
    forged = stranger.mint("user:admin", scopes_of_role("admin"), ttl_s=60)
    expired = credentials.issuer().mint("user:admin", scopes_of_role("admin"), ttl_s=-120)
    scraper = credentials.token("metrics")  # valid, but holds only the metrics scope
    viewer = credentials.issuer().mint("user:viewer", scopes_of_role("viewer"), ttl_s=60)
    open_routes = PUBLIC | (GATEWAY_INFERENCE if service == "gateway" else set())
    client = TestClient(app)  # no `with`: no lifespan, no NATS or S3
    refused: dict[str, list[str]] = {"anonymous": [], "forged": [], "expired": [], "scope": []}
    for method, path in routes:
        if path in open_routes:
            continue
        where = f"{method} {path}"
        for kind, token in (("anonymous", None), ("forged", forged), ("expired", expired)):
            answer = call(client, method, path, token)
            if answer.status_code != 401 or answer.headers.get("www-authenticate") != "Bearer":
                refused[kind].append(f"{where} -> {answer.status_code}")
        if call(client, method, path, viewer if path == METRICS else scraper).status_code != 403:
            refused["scope"].append(where)
    assert refused == {"anonymous": [], "forged": [], "expired": [], "scope": []}


def test_health_and_readiness_answer_anyone(var_dir: Path) -> None:
    client = TestClient(build_app("registry", var_dir))
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503  # no lifespan: not ready, but it answers


def test_a_gateways_inference_routes_take_its_api_key_when_set(var_dir: Path) -> None:
    client = TestClient(build_app("gateway", var_dir, api_key="local-key"))
    for path in sorted(GATEWAY_INFERENCE):
        method = "GET" if path == "/v1/models" else "POST"
        assert call(client, method, path, None).status_code == 401, path
        assert call(client, method, path, "local-key").status_code != 401, path


# Route -> the roles it lets in; every other role gets 403. What only a service may do is in
# no person's token, not even an admin's.
ROLE_MATRIX = [
    ("registry", "POST", "/v1/variants", {"service:optimizer"}),
    ("registry", "POST", "/v1/variants/x1/reports", {"service:validator"}),
    ("registry", "POST", "/v1/variants/x1/rollbacks", {"service:rollout"}),
    ("registry", "POST", "/v1/models", {"publisher", "admin"}),
    ("registry", "POST", "/v1/admin/gc", {"admin"}),
    ("registry", "POST", "/v1/admin/lineage/rebuild", {"admin"}),
    ("registry", "GET", "/v1/manifests/x1", set(ROLE_SCOPES) - {"metrics"}),
    ("rollout", "POST", "/v1/rollouts", {"operator", "admin"}),
    ("rollout", "POST", "/v1/rollouts/x1/pause", {"operator", "admin"}),
    ("optimizer", "POST", "/v1/jobs/x1/cancel", {"operator", "admin"}),
    ("gateway", "GET", METRICS, {"metrics", "admin"}),
    ("console", "GET", METRICS, {"metrics", "admin"}),
    ("telemetry", "GET", "/v1/fleet/health", set(ROLE_SCOPES) - {"metrics", "gateway"}),
    ("telemetry", "GET", METRICS, {"metrics", "admin"}),
]
ROLES = sorted(ROLE_SCOPES)


@pytest.mark.parametrize(("service", "method", "path", "allowed"), ROLE_MATRIX)
def test_each_role_reaches_only_its_routes(
    service: str, method: str, path: str, allowed: set[str], var_dir: Path,
    credentials: LocalCredentials,
) -> None:  # fmt: skip
    # Past the check, handlers fail without NATS: a 5xx there still shows the role got in.
    client = TestClient(build_app(service, var_dir), raise_server_exceptions=False)
    issuer = credentials.issuer()
    outcomes = {}
    for role in ROLES:
        token = issuer.mint(f"test:{role}", scopes_of_role(role), ttl_s=60)
        outcomes[role] = call(client, method, path, token).status_code
    denied = {role for role, status in outcomes.items() if status == 403}
    assert denied == set(ROLES) - allowed, outcomes
    assert all(status != 401 for status in outcomes.values()), outcomes


def test_every_scope_is_in_some_role() -> None:
    granted = set(itertools.chain.from_iterable(scopes_of_role(r) for r in ROLES))
    assert granted == set(Scope)
