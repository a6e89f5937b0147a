"""`slmops publish`, `slmops models` and `slmops lineage`: the registry's HTTP API from a shell.

Plain typer command functions; ``slmops.cli.main`` registers them with ``app.command(...)``.
Publishing is the API's two steps: stream the artifact (and evaluation set) to ``POST
/v1/blobs`` with its digest computed beforehand, then ``POST /v1/models`` referencing it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from pydantic import Field, TypeAdapter, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from slmops.auth import BearerTokenFile, MissingTokenError
from slmops.cli import packaging as pkg
from slmops.cli.render import local_time, render_lineage, short_digest, text_row
from slmops.events.payloads import ModelFormat, ModelName, Pooling, Task, Token, Version
from slmops.settings import AuthSettings

console_out = Console(highlight=False, soft_wrap=True)
console_err = Console(stderr=True, highlight=False, soft_wrap=True)
_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
_SLOW = httpx.Timeout(30.0, connect=5.0, read=3600.0)  # the registry checks big artifacts


class CliSettings(BaseSettings):
    """What the CLI talks to. Env prefix ``SLMOPS_``."""

    model_config = SettingsConfigDict(env_prefix="SLMOPS_", extra="ignore")

    registry_url: str = Field(
        "http://127.0.0.1:8101",
        description="Base URL of the registry HTTP API (`slmops up` serves it on port 8101).",
    )
    optimizer_url: str = Field(
        "http://127.0.0.1:8102",
        description="Base URL of the optimizer HTTP API (`slmops up` serves it on port 8102).",
    )
    rollout_url: str = Field(
        "http://127.0.0.1:8104",
        description="Base URL of the rollout HTTP API (`slmops up` serves it on port 8104).",
    )
    var_dir: Path = Field(Path("var"), description="The local stack's state folder.")
    auth: AuthSettings = Field(default_factory=AuthSettings)


def cli_auth(local_name: str = "admin") -> BearerTokenFile:
    """The CLI's credentials: SLMOPS_AUTH_TOKEN_FILE, else the local stack's ``local_name``
    token (``admin``; the fleet simulator uses ``simulator``)."""
    settings = CliSettings()
    return BearerTokenFile(settings.auth.token_path(settings.var_dir, local_name))


class CliError(Exception):
    """Printed as ``error: <message>``, exit 1, no traceback."""


class HttpError(CliError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text or response.reason_phrase
    if isinstance(detail, list):  # a request validation error: one line per field
        detail = "; ".join(
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail
        )
    if isinstance(detail, dict):  # a refusal with its reasons, e.g. one per device class
        reasons = detail.get("reasons") or {}
        lines = "".join(f"\n  {key}: {why}" for key, why in sorted(reasons.items()))
        return f"{detail.get('message', '')} (HTTP {response.status_code}){lines}"
    return f"{detail} (HTTP {response.status_code})"


class RegistryClient(httpx.Client):
    """A small httpx client: unreachable service and 4xx/5xx become :class:`CliError`."""

    service = "registry"
    env_var = "SLMOPS_REGISTRY_URL"

    def __init__(self, url: str | None) -> None:
        self.url = (url or self.default_url()).rstrip("/")
        super().__init__(base_url=self.url, timeout=_TIMEOUT, auth=cli_auth())

    def default_url(self) -> str:
        return CliSettings().registry_url

    def call(self, method: str, path: str, *, slow: bool = False, **kwargs: Any) -> httpx.Response:
        try:
            response = self.request(method, path, timeout=_SLOW if slow else _TIMEOUT, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise CliError(
                f"{self.service} not reachable at {self.url}: start it with `slmops up` "
                f"or set {self.env_var}"
            ) from exc
        except httpx.HTTPError as exc:
            raise CliError(f"{self.service} at {self.url} failed: {exc!r}") from exc
        except MissingTokenError as exc:
            raise CliError(str(exc)) from None
        if response.is_error:
            raise HttpError(response.status_code, _detail(response))
        return response

    def upload(
        self, path: Path, digest: str, size: int, label: str, progress: bool,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:  # fmt: skip
        """Stream ``path`` to ``POST /v1/blobs`` in 1 MiB chunks, with a progress bar (or
        ``on_bytes`` told of each chunk, for a caller that shows its own progress)."""
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            console=console_err,
            disable=not progress or on_bytes is not None,
        )
        headers = {"Content-Length": str(size), "X-Expected-Digest": digest}
        with bar:
            task = bar.add_task(f"uploading {label}", total=size)
            chunks = pkg.iter_chunks(path, on_bytes or (lambda n: bar.advance(task, n)))
            stored = self.call("POST", "/v1/blobs", content=chunks, headers=headers, slow=True)
        if (answer := stored.json().get("digest")) != digest:
            raise CliError(f"the registry stored {label} as {answer}, not {digest}")

    def publish_version(
        self, path: Path, fmt: str, fields: dict[str, Any], *, eval_set: Path | None = None,
        progress: bool = False, on_bytes: Callable[[int], None] | None = None,
    ) -> httpx.Response:  # fmt: skip
        """Upload the artifact at ``path`` (a folder packed as a tar) and its evaluation set,
        then ``POST /v1/models`` with ``fields`` (name, version, task, ...) referencing them."""
        with pkg.prepared_artifact(path, fmt) as artifact:
            self.upload(artifact.path, artifact.digest, artifact.size_bytes, path.name,
                        progress, on_bytes)  # fmt: skip
            eval_digest = None
            if eval_set is not None:
                eval_digest, eval_size = pkg.hash_file(eval_set)
                self.upload(eval_set, eval_digest, eval_size, eval_set.name, progress, on_bytes)
            body = {**fields, "format": fmt, "artifact_digest": artifact.digest,
                    "eval_set_digest": eval_digest}  # fmt: skip
            return self.call("POST", "/v1/models", json=body, slow=True)


def fail(message: str) -> NoReturn:
    console_err.print(f"error: {message}", markup=False, style="red")
    raise typer.Exit(1)


RegistryUrl = Annotated[
    str | None,
    typer.Option(
        "--registry-url",
        help="Registry base URL (default: $SLMOPS_REGISTRY_URL, else http://127.0.0.1:8101).",
        show_default=False,
    ),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print the JSON the registry answered.")]


def validated(kind: Any, value: str, what: str) -> str:
    """``value`` checked against the registry's own pattern, before uploading anything."""
    try:
        return str(TypeAdapter(kind).validate_python(value))
    except ValidationError as exc:
        fail(f"invalid {what} {value!r}: {exc.errors()[0]['msg']}")


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
        with RegistryClient(registry_url) as client:
            response = client.publish_version(
                path, fmt, fields, eval_set=eval_set, progress=progress
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
        with RegistryClient(registry_url) as client:
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
        with RegistryClient(registry_url) as client:
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
