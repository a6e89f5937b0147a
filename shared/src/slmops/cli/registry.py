"""`slmops publish`, `slmops models`, `slmops lineage` and `slmops field`: the registry's HTTP
API from a shell.

Plain typer command functions; ``slmops.cli.main`` registers them with ``app.command(...)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from slmops.cli import packaging as pkg
from slmops.cli.common import (
    CliError,
    HttpError,
    JsonOutput,
    RegistryUrl,
    ServiceClient,
    console_err,
    console_out,
    fail,
    validated,
)
from slmops.cli.publishing import publish_version
from slmops.cli.render import local_time, render_lineage, short_digest, text_row
from slmops.events.payloads import ModelFormat, ModelName, Pooling, Task, Token, Version
from slmops.signatures import verify


def _labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--label {pair!r} is not key=value")
        labels[key.strip()] = value
    return labels


def publish(
    path: Annotated[Path, typer.Argument(help="A .gguf or .onnx file, or a model folder.")],
    name: Annotated[str, typer.Option("--name", help="Model name.")],
    version: Annotated[str, typer.Option("--version", help="Version to publish.")],
    task: Annotated[
        str | None,
        typer.Option(
            help=f"{' | '.join(pkg.TASKS)} "
            "(required, except for gguf, where it defaults to text-generation)"
        ),
    ] = None,
    model_format: Annotated[
        str | None,
        typer.Option("--format", help=f"{' | '.join(pkg.FORMATS)} (default: inferred from PATH)"),
    ] = None,
    eval_set: Annotated[
        Path | None, typer.Option("--eval", help="JSONL evaluation set to attach.")
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option("--classes", help="Device classes, comma separated (default: every class)."),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="key=value label; repeatable.")
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            help="Encoders: the ONNX output holding the embeddings (default: chosen by shape "
            "and name; the registry refuses a model where that is ambiguous).",
        ),
    ] = None,
    pooling: Annotated[
        str | None,
        typer.Option(
            "--pooling",
            help="Encoders: mean | cls (token embeddings) | none (already one vector per text)"
            " (default: by the output's shape).",
        ),
    ] = None,
    json_output: JsonOutput = False,
    registry_url: RegistryUrl = None,
) -> None:
    """Upload a model artifact (a folder is packed as a tar) and publish it as NAME@VERSION."""
    if not path.exists():
        fail(f"no such file or folder: {path}")
    if eval_set is not None and not eval_set.is_file():
        fail(f"--eval {eval_set} is not a file")
    name, version = validated(ModelName, name, "--name"), validated(Version, version, "--version")
    names = [c.strip() for c in (classes or "").split(",") if c.strip()]
    device_classes = [validated(Token, c, "device class") for c in names]
    labels = _labels(label or [])
    hints: dict[str, str] = {}
    if output is not None:
        if not output.strip():
            fail("--output needs the name of a graph output")
        hints["embedding_output"] = output
    if pooling is not None:
        hints["pooling"] = validated(Pooling, pooling, "--pooling")
    try:
        fmt = validated(ModelFormat, model_format or pkg.infer_format(path), "--format")
        task = task or ("text-generation" if fmt == "gguf" else None)
        if task is None:
            fail(f"pass --task ({', '.join(pkg.TASKS)}): {fmt} models have no default task")
        task = validated(Task, task, "--task")
        progress = not json_output and console_err.is_terminal
        fields = {"model_name": name, "version": version, "task": task, "labels": labels,
                  "device_classes": device_classes, **hints}  # fmt: skip
        with ServiceClient("registry", registry_url) as client:
            response = publish_version(
                client, path, fmt, fields, eval_set=eval_set, progress=progress
            )
    except (CliError, pkg.PackagingError, OSError) as exc:
        fail(str(exc))
    signed = response.json()
    if json_output:
        print(json.dumps(signed, indent=2))
        return
    event = response.headers.get("X-Event-Id", "?")
    again = "" if response.status_code == 201 else "; unchanged, this exact version existed"
    console_out.print(
        f"{name}@{version} manifest {signed.get('digest')} (event {event}{again})", markup=False
    )
    if trace_id := response.headers.get("X-Trace-Id"):
        console_out.print(
            f"its journey is trace {trace_id}: `slmops trace show {trace_id}`", markup=False
        )


def models(json_output: JsonOutput = False, registry_url: RegistryUrl = None) -> None:
    """List every published model version."""
    try:
        with ServiceClient("registry", registry_url) as client:
            listing = client.call("GET", "/v1/models").json()
    except CliError as exc:
        fail(str(exc))
    if json_output:
        print(json.dumps(listing, indent=2))
        return
    if not listing:
        console_out.print("no models published", markup=False)
        return
    table = Table(title="published models", title_justify="left")
    for column in ("name", "version", "artifact", "published_at"):
        table.add_column(column)
    for model in sorted(listing, key=lambda m: str(m.get("model_name"))):
        for item in sorted(model.get("versions") or [], key=lambda v: str(v.get("published_at"))):
            digest, when = (
                short_digest(item.get("artifact_digest")),
                local_time(item.get("published_at")),
            )
            table.add_row(*text_row(model.get("model_name"), item.get("version"), digest, when))
    console_out.print(table, soft_wrap=False)


def fetch_lineage(registry_url: str | None, name: str, version: str) -> dict[str, Any]:
    """The lineage document of a model version; exits with a readable error otherwise."""
    try:
        with ServiceClient("registry", registry_url) as client:
            try:
                document: dict[str, Any] = client.call(
                    "GET", f"/v1/models/{name}/{version}/lineage"
                ).json()
            except HttpError as exc:
                if exc.status != 404:
                    raise
                try:  # a 404 from a registry without the endpoint: say so, not "no model"
                    client.call("GET", f"/v1/models/{name}/{version}")
                except HttpError:
                    fail(f"no model {name} {version}")
                raise
    except CliError as exc:
        fail(str(exc))
    return document


def lineage(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Model version.")],
    json_output: JsonOutput = False,
    registry_url: RegistryUrl = None,
) -> None:
    """Show what became of a model version: variants, validations, releases, rollouts."""
    document = fetch_lineage(registry_url, name, version)
    if json_output:
        print(json.dumps(document, indent=2))
    else:
        console_out.print(render_lineage(document), soft_wrap=False)


def field(
    variant_id: Annotated[str, typer.Argument(help="The variant's id.")],
    json_output: JsonOutput = False,
    registry_url: RegistryUrl = None,
) -> None:
    """Show a variant's device-measured figures per class, checking the registry's signature."""
    variant_id = validated(Token, variant_id, "variant id")
    try:
        with ServiceClient("registry", registry_url) as client:
            found = client.call("GET", f"/v1/variants/{variant_id}/field").json()
            pem = client.call("GET", "/v1/keys").json()["pem"]
    except CliError as exc:
        fail(str(exc))
    if json_output:
        print(json.dumps(found, indent=2))
        return
    console_out.print(f"{variant_id} of {found['model_name']} {found['version']}", markup=False)
    if not found["classes"]:
        console_out.print("  no fleet has measured it yet", markup=False)
        return
    table = Table(title="measured on the devices (latest per class)", title_justify="left")
    for column in ("class", "span", "gateways", "requests", "errors", "p50 ms", "p95 ms",
                   "ttft p95 ms", "tokens/s", "peak MB", "over budget", "signature"):  # fmt: skip
        table.add_column(column)
    for signed in found["classes"]:
        ok = verify(pem, signed["statement"].encode(), signed["signature"])
        m = json.loads(signed["statement"]) if ok else signed["measured"]
        f = m["figures"]
        broken = [g["name"] for g in m.get("gates", []) if g.get("passed") is False]
        table.add_row(*text_row(
            m["device_class"], f"{local_time(m['since'])} - {local_time(m['until'])}",
            f["gateways"], f["requests"], f"{f['error_rate']:.2%}", _num(f["latency_p50_ms"]),
            _num(f["latency_p95_ms"]), _num(f["ttft_p95_ms"]), _num(f["decode_tokens_per_s"]),
            _num(f["peak_memory_mb"]), ", ".join(broken) or "-",
            f"valid ({signed['key_id']})" if ok else "INVALID",
        ))  # fmt: skip
    console_out.print(table, soft_wrap=False)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
