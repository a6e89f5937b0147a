"""deploy/ agrees with the code: images, ports, settings, consumers, Ray and NATS.

Offline: no image is built, no cluster asked. Manifests are read as data and compared with what
the code says (entry points, settings classes, the consumers each app declares, Serve app).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import pytest
import yaml
from packaging.requirements import Requirement
from pydantic import ValidationError

from slmops import __version__
from slmops.auth.bususers import ensure_local_bus_users
from slmops.auth.local import ensure_local_credentials
from slmops.events import GatewayAssignment, GatewayReport
from slmops.profiles import load_profiles
from slmops.settings import AuthSettings, ConsumerSettings, PlatformSettings, ServiceSettings
from slmops.stack.binaries import nats_server_binary
from slmops.stack.components import discover_services, service_env_prefix, service_module
from slmops_console.settings import ConsoleSettings
from slmops_optimizer import compute
from slmops_optimizer.settings import OptimizerSettings

DEPLOY = Path(__file__).parents[2] / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"  # every service's image, by build arguments
IMAGE_SERVICE_VAR = "SLMOPS_IMAGE_SERVICE"  # set by the Dockerfile: no setting, the service
SERVICES = discover_services()
IMAGE = "ghcr.io/slmops/slmops-"
COMPOSE: dict[str, Any] = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
K8S = [  # every resource (kustomization.yaml is not one)
    d
    for p in sorted((DEPLOY / "k8s").glob("*.yaml"))
    for d in yaml.safe_load_all(p.read_text())
    if d and "metadata" in d
]
LEAF_CONF = (DEPLOY / "nats" / "leaf-edge-site.conf").read_text()
EnvNames = Callable[..., list[str]]  # the setting_env_names fixture (conftest.py)
Settings = dict[str, type[ServiceSettings]]  # the service_settings fixture


def k8s(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in K8S if d["kind"] == kind and d["metadata"]["name"] == name)


HUB_CONF: str = k8s("ConfigMap", "nats-config")["data"]["nats.conf"]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile's text, continuations joined, comments out."""
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    return [(ln.split()[0].upper(), ln.split(None, 1)[1]) for ln in lines if ln and ln[0] != "#"]


def build_args(service: str) -> dict[str, str]:
    """The build arguments compose passes to deploy/docker/Dockerfile for ``service``."""
    return {k: str(v) for k, v in COMPOSE["services"][service]["build"]["args"].items()}


def declared_args() -> dict[str, str]:
    """The Dockerfile's global ARGs (before its first FROM) with their defaults."""
    declared: dict[str, str] = {}
    for op, args in instructions(DOCKERFILE.read_text()):
        if op == "FROM":
            break
        name, _, default = args.partition("=")
        declared[name] = default.strip('"')
    return declared


def expand(text: str, values: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced as BuildKit does in ENV, COPY, EXPOSE and FROM (names
    it does not know, like ``$PATH``, are left to the image's environment)."""
    pattern = re.compile(r"\$\{(\w+)\}|\$(\w+)")
    return pattern.sub(lambda m: values.get(m[1] or m[2], m[0]), text)


def dockerfile(service: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of ``service``'s image: deploy/docker/Dockerfile with compose's
    build arguments for it, the final stage preceded by the stages it is built FROM (the
    builder stage is not among them), build arguments substituted."""
    values = declared_args() | build_args(service)
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for op, args in instructions(DOCKERFILE.read_text()):
        if op == "FROM":
            base, _, name = expand(args, values).partition(" AS ")
            current = stages[name or "<final>"] = [("FROM", base)]
        elif current:  # after the first FROM
            substituted = op in ("ENV", "COPY", "EXPOSE", "WORKDIR", "USER")
            current.append((op, expand(args, values) if substituted else args))

    def chain(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
        base = steps[0][1]
        return (chain(stages[base]) if base in stages else steps[:1]) + steps[1:]

    return chain(stages["<final>"])


def docker_env(service: str) -> dict[str, str]:
    pairs = [p for op, args in dockerfile(service) if op == "ENV" for p in shlex.split(args)]
    return dict(pair.split("=", 1) for pair in pairs)


def image_service(image: str) -> str:
    return image.removeprefix(IMAGE).split(":")[0]


def compose_services() -> Iterator[tuple[str, str]]:
    """(compose service, slmops service) of each compose service running an slmops image."""
    for name, spec in COMPOSE["services"].items():
        if spec.get("image", "").startswith(IMAGE):
            yield name, image_service(spec["image"])


def containers(*kinds: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(service, container) of the k8s workloads (of ``kinds``, default all) that run an slmops
    image; the RayService's Ray pods run the optimizer's."""
    for doc in (d for d in K8S if not kinds or d["kind"] in kinds):
        spec = doc.get("spec", {})
        spec = spec.get("rayClusterConfig", spec)  # a RayService: its cluster's pods
        pods = [spec.get("template"), spec.get("headGroupSpec", {}).get("template")]
        pods += [group["template"] for group in spec.get("workerGroupSpecs", [])]
        for pod in filter(None, pods):
            for c in pod["spec"]["containers"]:
                if c["image"].startswith(IMAGE):
                    yield image_service(c["image"]), c


def k8s_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        doc = k8s(kind, (source.get("configMapRef") or source["secretRef"])["name"])
        env.update(doc.get("data") or doc["stringData"])
    # valueFrom: only the gateway id, from the node's name
    return env | {e["name"]: e.get("value", "edge-node-1") for e in container.get("env", [])}


def compose_env(name: str) -> dict[str, str]:
    """A compose service's environment, ``${VAR:-default}`` as its default, other variables
    as a stand-in real value."""
    env = COMPOSE["services"][name].get("environment", {})
    real = "x-real-value"
    sub = re.compile(r"\$\{\w+(?::?([-?])([^}]*))?\}")
    return {k: sub.sub(lambda m: m[2] if m[1] == "-" else real, str(v)) for k, v in env.items()}


def healthcheck_module() -> ModuleType:
    """deploy/docker/healthcheck.py, the images' probe, imported from its file."""
    spec = importlib.util.spec_from_file_location(
        "healthcheck", DEPLOY / "docker" / "healthcheck.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probed_port(command: list[str], env: dict[str, str]) -> int:
    """The port ``python /opt/slmops/healthcheck.py [port] [path]`` probes in a container
    whose environment is ``env`` (without a port: the image's own service's)."""
    assert command[:2] == ["python", "/opt/slmops/healthcheck.py"]
    args = command[2:]
    if args and not args[0].startswith("/"):
        return int(args[0])
    with mock.patch.dict(os.environ, env, clear=True):
        port: int = healthcheck_module().own_port()
    return port


class StrictLoader(yaml.SafeLoader):
    """Refuses a key twice in one mapping: PyYAML keeps the last, so two resources run together
    (a missing ``---``) would silently become one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [key.value for key, _ in node.value if isinstance(key, yaml.ScalarNode)]
        if twice := sorted({k for k in keys if keys.count(k) > 1}):
            raise yaml.MarkedYAMLError("in a mapping", node.start_mark, f"keys twice: {twice}")
        return super().construct_mapping(node, deep=deep)


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.y*ml"))

    assert len(files) > 5
    assert all(list(yaml.load_all(path.read_text(), Loader=StrictLoader)) for path in files)


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_has_an_image_a_compose_service_and_a_workload(service: str) -> None:
    # The gateway is an edge agent: a DaemonSet (one per device), the others Deployments.
    kind = "DaemonSet" if service == "gateway" else "Deployment"
    compose = COMPOSE["services"][service]

    assert compose["build"]["context"] == "../.."
    assert compose["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert compose["build"]["args"]["SERVICE"] == service
    assert compose["image"] == f"{IMAGE}{service}:${{IMAGE_TAG:-{__version__}}}"
    assert service in {svc for svc, _ in containers(kind)}
    images = {c["image"] for svc, c in containers() if svc == service}
    assert images == {f"{IMAGE}{service}:{__version__}"}


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_is_multi_stage_non_root_and_runs_the_service(
    service: str, service_settings: Settings
) -> None:
    steps = dockerfile(service)
    args = {op: a for op, a in steps}  # the last of each instruction
    env = docker_env(service)
    port = service_settings[service].model_fields["port"].default
    prefix = f"SLMOPS_{service.upper()}_"
    health = json.loads(args["HEALTHCHECK"].split(" CMD ", 1)[1])

    # The venv is built in another stage and copied: no build tools in the image.
    assert any(op == "COPY" and a.startswith("--from=builder ") for op, a in steps)
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert int(args["USER"]) >= 1000  # numeric and not root: runAsNonRoot can verify it
    assert args["EXPOSE"] == str(port) == env[f"{prefix}PORT"]
    assert probed_port(health, env) == port
    assert env[f"{prefix}HOST"] == "0.0.0.0"  # a container listens outside
    assert health[-1] == "/healthz"
    assert env[IMAGE_SERVICE_VAR] == service
    assert importlib.util.find_spec(f"{service_module(service)}.__main__") is not None
    if "profiles_dir" in service_settings[service].model_fields:  # not the source checkout's
        copied = [a.split()[-1] for op, a in steps if op == "COPY" and "deploy/profiles" in a]
        assert copied == [env[f"{prefix}PROFILES_DIR"]]


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_builds_from_the_one_dockerfile_with_its_arguments(
    service: str, service_settings: Settings
) -> None:
    settings = service_settings[service]
    args = build_args(service)
    requires = {Requirement(r).name for r in importlib.metadata.requires(f"slmops-{service}") or []}
    # the optimizer's compute: torch from its CPU index, Ray pinned for client and cluster
    compute = {"TORCH_VERSION": "torch", "RAY_VERSION": "ray"}

    assert set(args) <= set(declared_args())  # no argument the Dockerfile would ignore
    assert args["SERVICE"] == service
    assert args["SETTINGS_PREFIX"] == service_env_prefix(service)
    assert args["PORT"] == str(settings.model_fields["port"].default)
    assert (args.get("PROFILES", "no") == "yes") == ("profiles_dir" in settings.model_fields)
    for arg, package in compute.items():
        assert (arg in args) == (package in requires)


def test_no_service_keeps_a_dockerfile_of_its_own() -> None:
    assert sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*Dockerfile*")) == [
        "docker/Dockerfile"
    ]
    builds = [spec["build"] for spec in COMPOSE["services"].values() if "build" in spec]
    assert len(builds) >= 5
    assert {b["dockerfile"] for b in builds} == {"deploy/docker/Dockerfile"}


@pytest.mark.parametrize("service", SERVICES)
def test_the_image_entrypoint_runs_its_service_module(service: str, tmp_path: Path) -> None:
    # A stand-in `python` first on PATH prints what the entrypoint runs.
    (tmp_path / "python").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "python").chmod(0o755)
    entrypoint = json.loads({op: a for op, a in dockerfile(service)}["ENTRYPOINT"])
    env = {
        "PATH": f"{tmp_path}:/usr/bin:/bin",
        IMAGE_SERVICE_VAR: docker_env(service)[IMAGE_SERVICE_VAR],
    }

    ran = subprocess.run([*entrypoint, "--an-argument"], env=env, capture_output=True, text=True)

    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["-m", service_module(service), "--an-argument"]


@pytest.mark.parametrize("service", SERVICES)
def test_ports_agree_across_compose_and_k8s(service: str, service_settings: Settings) -> None:
    port = service_settings[service].model_fields["port"].default
    compose = COMPOSE["services"][service]
    workloads = containers("Deployment", "DaemonSet")
    workload_ports = [p for svc, c in workloads if svc == service for p in c["ports"]]
    svc_ports = k8s("Service", f"slmops-{service}")["spec"]["ports"]

    assert [p.rsplit(":", 1)[1] for p in compose["ports"]] == [str(port)]
    assert compose["healthcheck"]["test"][0] == "CMD"
    assert compose["healthcheck"]["test"][-1] == "/readyz"
    assert probed_port(compose["healthcheck"]["test"][1:], docker_env(service)) == port
    assert workload_ports == [{"name": "http", "containerPort": port}]
    assert svc_ports == [{"name": "http", "port": port, "targetPort": "http"}]


def test_every_slmops_env_var_is_a_real_setting(
    service_settings: Settings, setting_env_names: EnvNames
) -> None:
    named = [(svc, set(docker_env(svc))) for svc in SERVICES]
    named += [(svc, set(k8s_env(c))) for svc, c in containers()]
    named += [(svc, set(compose_env(name))) for name, svc in compose_services()]

    def valid(svc: str) -> set[str]:
        classes = (PlatformSettings, AuthSettings, ConsumerSettings, service_settings[svc])
        return {name for cls in classes for name in setting_env_names(cls)}

    unknown = {(s, n) for s, names in named for n in names - valid(s) - {IMAGE_SERVICE_VAR}
               if n.startswith("SLMOPS_")}  # fmt: skip

    assert len(named) > len(SERVICES) * 2
    assert unknown == set()


def test_settings_accept_the_manifests_and_refuse_their_placeholders(
    service_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def load(service: str, env: dict[str, str]) -> None:
        for name in [n for n in os.environ if n.startswith("SLMOPS_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        service_settings[service]()

    for service, c in containers():
        env = k8s_env(c)
        if "SLMOPS_S3_ACCESS_KEY_ID" in env:  # the template's "changeme" fails fast ...
            with pytest.raises(ValidationError, match="placeholder"):
                load(service, docker_env(service) | env)
        load(service, docker_env(service) | {k: v.replace("changeme", "x") for k, v in env.items()})
    for name, service in compose_services():
        load(service, docker_env(service) | compose_env(name))


def test_compose_publishes_ports_on_loopback_only() -> None:
    published = [p for spec in COMPOSE["services"].values() for p in spec.get("ports", [])]

    assert len(published) > len(SERVICES)
    assert [p for p in published if not p.startswith("127.0.0.1:")] == []


def test_compose_identities_are_files_slmops_auth_init_writes(tmp_path: Path) -> None:
    # What `slmops auth init` and `slmops auth enroll compose-gw-1` leave in SLMOPS_AUTH_DIR.
    creds = ensure_local_credentials(tmp_path)
    creds.mint_gateway("compose-gw-1")
    users = ensure_local_bus_users(tmp_path, ("compose-gw-1",))
    written = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "auth").rglob("*")}
    named = {
        name: str(secret["file"]).split("}/", 1)[1]
        for name, secret in COMPOSE["secrets"].items()
        if str(secret["file"]).endswith((".nk", ".jwt"))
    }

    assert {"console-nkey", "rollout-nkey", "rollout-token"} <= set(named)
    assert {name: f for name, f in named.items() if f not in written} == {}
    # The NATS users every compose service logs in as are in the users.conf NATS includes.
    assert "# service-console" in users.users_conf_file.read_text()


def test_the_console_reaches_the_five_apis_and_only_operators_reach_it(
    service_settings: Settings,
) -> None:
    # The console is the one workload whose egress is closed: it serves browsers, and it must
    # reach exactly what its settings name (each API, by its Service or compose name) and NATS.
    apis = [n.removesuffix("_url") for n in ConsoleSettings.model_fields if n.endswith("_url")]
    port = {svc: service_settings[svc].model_fields["port"].default for svc in apis}
    [(_, pod)] = [(s, c) for s, c in containers("Deployment") if s == "console"]
    url_env = {svc: f"SLMOPS_CONSOLE_{svc.upper()}_URL" for svc in apis}
    k8s_urls = {svc: k8s_env(pod)[name] for svc, name in url_env.items()}
    compose_urls = {svc: compose_env("console")[name] for svc, name in url_env.items()}
    [policy] = [
        d["spec"] for d in K8S
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "slmops-console"}
    ]  # fmt: skip
    reaches = {
        (peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"], p["port"])
        for rule in policy["egress"]
        for peer in rule["to"]
        if "namespaceSelector" not in peer  # in this namespace
        for p in rule["ports"]
    }
    own = ConsoleSettings.model_fields["port"].default

    assert sorted(apis) == ["optimizer", "registry", "rollout", "telemetry", "validator"]
    assert k8s_urls == {svc: f"http://slmops-{svc}:{port[svc]}" for svc in apis}
    assert compose_urls == {svc: f"http://{svc}:{port[svc]}" for svc in apis}
    for svc in apis:
        assert k8s("Service", f"slmops-{svc}")["spec"]["ports"][0]["port"] == port[svc]
    assert reaches == {(f"slmops-{svc}", port[svc]) for svc in apis} | {("nats", 4222)}
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    # Every way in names who (a rule without `from` would let anyone, edge sites too) and
    # reaches only its HTTP port.
    assert all(rule.get("from") for rule in policy["ingress"])
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {own}
    # It acts with the signed-in operator's token only: it is given none of its own.
    assert "SLMOPS_AUTH_TOKEN_FILE" not in k8s_env(pod) | compose_env("console")
    assert not any("token" in s for s in COMPOSE["services"]["console"]["secrets"])


def test_gateways_declare_real_device_classes() -> None:
    classes = load_profiles(DEPLOY / "profiles")
    for pod in (d["spec"]["template"]["spec"] for d in K8S if d["kind"] == "DaemonSet"):
        wanted = k8s_env(pod["containers"][0])["SLMOPS_GATEWAY_DEVICE_CLASS"]
        assert wanted in classes
        assert pod["nodeSelector"]["slmops.dev/device-class"] == wanted
    assert compose_env("gateway")["SLMOPS_GATEWAY_DEVICE_CLASS"] in classes


@pytest.fixture(scope="module")
def durables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[tuple[str, str]]]:
    """(stream, durable) of each service's consumers, from the app its entry point builds."""
    found: dict[str, set[tuple[str, str]]] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLMOPS_ENV", "local")
        mp.setenv("SLMOPS_VAR_DIR", str(tmp_path_factory.mktemp("var")))
        mp.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
        for service in SERVICES:
            app = importlib.import_module(f"{service_module(service)}.app").create_app()
            runtime = app.state.runtime  # its per-event consumers and its batched ones
            consumers = [*runtime.topology.consumers, *runtime.batch_consumers]
            found[service] = {(c.stream, c.durable) for c in consumers}
    return found


def test_keda_scales_deployments_on_their_real_durable_consumers(
    durables: dict[str, set[tuple[str, str]]],
) -> None:
    scaled = [d for d in K8S if d["kind"] == "ScaledObject"]
    monitor = {p["name"]: p["port"] for p in k8s("Service", "nats-headless")["spec"]["ports"]}

    assert scaled
    for obj in scaled:
        target = k8s("Deployment", obj["spec"]["scaleTargetRef"]["name"])
        service = target["metadata"]["name"].removeprefix("slmops-")
        triggers = [t["metadata"] for t in obj["spec"]["triggers"]]
        assert "replicas" not in target["spec"]  # KEDA owns the count
        assert {t["type"] for t in obj["spec"]["triggers"]} == {"nats-jetstream"}
        assert {(t["stream"], t["consumer"]) for t in triggers} == durables[service] != set()
        for t in triggers:
            assert t["natsServerMonitoringEndpoint"] == (
                f"nats-headless.slmops.svc.cluster.local:{monitor['monitor']}"
            )
            assert re.search(rf"\b{t['account']}: \{{\s*jetstream: enabled", HUB_CONF)


def test_ray_service_deploys_the_optimizer_app_and_the_optimizer_attaches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    ray = k8s("RayService", "slmops-ray")
    cluster = ray["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    serve = ServeDeploySchema.model_validate(yaml.safe_load(ray["spec"]["serveConfigV2"]))
    [app] = serve.applications
    module, attr = app.import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    pins = build_args("optimizer")
    requires = importlib.metadata.requires("slmops-optimizer") or []
    needs = {r.name: r for r in map(Requirement, requires)}
    port = head["rayStartParams"]["ray-client-server-port"]
    head_container = head["template"]["spec"]["containers"][0]
    ports = {p["name"]: str(p["containerPort"]) for p in head_container["ports"]}
    [workers] = cluster["workerGroupSpecs"]
    worker_cpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    optimizer = k8s_env(next(c for _, c in containers() if c["name"] == "optimizer"))
    compose_head = COMPOSE["services"]["ray-head"]
    # The builder runs in a Ray pod: its settings read that pod's env, then the args.
    for name in [n for n in os.environ if n.startswith("SLMOPS_")]:
        monkeypatch.delenv(name)
    pod_env = docker_env("optimizer") | k8s_env(head_container)
    for name, value in pod_env.items():
        monkeypatch.setenv(name, value.replace("changeme", "x"))
    monkeypatch.setenv("SLMOPS_VAR_DIR", str(tmp_path))
    built = builder(app.args)  # what Serve does with import_path and args; Ray is not started
    deployment = built._bound_deployment

    assert app.name == compute.APP_NAME
    assert builder is compute.build_app
    assert set(app.args) <= set(OptimizerSettings.model_fields)
    assert app.route_prefix is None  # no HTTP route: the service calls it by handle
    assert isinstance(built, Application)
    assert deployment.name == "optimizer-worker"
    # The worker group holds the app at its largest.
    replicas, cpus = int(app.args["max_replicas"]), deployment.ray_actor_options["num_cpus"]
    assert replicas * cpus <= workers["maxReplicas"] * worker_cpus
    assert cluster["rayVersion"] == pins["RAY_VERSION"]
    assert needs["ray"].specifier.contains(pins["RAY_VERSION"])
    assert needs["torch"].specifier.contains(pins["TORCH_VERSION"])
    assert ports["client"] == port
    assert {"dashboard", "serve"} <= set(ports)  # KubeRay calls the first, requires the second
    # The optimizer only attaches, at the RayService's stable head service.
    assert optimizer["SLMOPS_OPTIMIZER_RAY_MODE"] == "rayservice"
    address = f"ray://{ray['metadata']['name']}-head-svc:{port}"
    assert optimizer["SLMOPS_OPTIMIZER_RAY_ADDRESS"] == address
    # Compose has no KubeRay: its one optimizer deploys the app on the Ray head itself.
    assert f"--ray-client-server-port={port}" in compose_head["entrypoint"]
    assert compose_env("optimizer")["SLMOPS_OPTIMIZER_RAY_MODE"] == "cluster"
    assert compose_env("optimizer")["SLMOPS_OPTIMIZER_RAY_ADDRESS"] == f"ray://ray-head:{port}"
    assert compose_head["image"] == COMPOSE["services"]["optimizer"]["image"]


def test_edge_leaf_node_reaches_the_hub(tmp_path: Path) -> None:
    leaf_port = re.search(r"leafnodes \{\s*listen: [\d.]+:(\d+)", HUB_CONF)
    hub_domain = re.search(r"jetstream \{[^}]*domain: (\S+)", HUB_CONF)
    services = {p["name"]: p["port"] for p in k8s("Service", "nats-leafnodes")["spec"]["ports"]}
    env = {"POD_NAME": "nats-0", "EDGE_SITE": "edge-test-1", "HUB_LEAF_URL": "nats-leaf://h:1"}
    env |= {f"NATS_{k}_PASSWORD": "pw" for k in ("SYS", "EDGE_BERLIN_1")}
    # Both include the NATS users `slmops auth init` / `enroll` write (public keys only).
    users = ensure_local_bus_users(tmp_path / "var", ("edge-gw-1",))
    for where in (tmp_path / "users.conf", tmp_path / "users" / "users.conf"):
        where.parent.mkdir(exist_ok=True)
        where.write_text(users.users_conf_file.read_text())

    assert leaf_port
    assert hub_domain
    assert services["leafnodes"] == int(leaf_port[1])
    assert f":{leaf_port[1]}" in LEAF_CONF
    # Gateways' JetStream calls are mapped to the hub's domain: it must be the hub's name.
    assert re.search(rf"default_js_domain: \{{ SLMOPS: {hub_domain[1]} \}}", LEAF_CONF)
    assert GatewayAssignment.event_type in LEAF_CONF
    assert GatewayReport.event_type in LEAF_CONF
    assert "no_auth_user" not in HUB_CONF + LEAF_CONF  # no anonymous client anywhere
    for name, text in (("hub.conf", HUB_CONF), ("leaf.conf", LEAF_CONF)):  # the real parser
        (tmp_path / name).write_text(text)
        check = [str(nats_server_binary()), "-t", "-c", str(tmp_path / name)]
        result = subprocess.run(check, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
