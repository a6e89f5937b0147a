"""What every ``slmops`` command shares: where output goes, how a command fails, the CLI's
settings and credentials, one HTTP client for the platform's services, common options and
argument parsers. Command modules import from here, never from each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import httpx
import typer
from pydantic import Field, TypeAdapter, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console

from slmops.auth import BearerTokenFile, MissingTokenError
from slmops.settings import AuthSettings

console_out = Console(highlight=False, soft_wrap=True)
console_err = Console(stderr=True, highlight=False, soft_wrap=True)
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
SLOW_TIMEOUT = httpx.Timeout(30.0, connect=5.0, read=3600.0)  # the registry checks big artifacts
FIRST_CONNECT_S = 10.0  # a command tells its user NATS is not there rather than wait for it


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
    telemetry_url: str = Field(
        "http://127.0.0.1:8107",
        description="Base URL of the telemetry HTTP API (`slmops up` serves it on port 8107).",
    )
    var_dir: Path = Field(Path("var"), description="The local stack's state folder.")
    auth: AuthSettings = Field(default_factory=AuthSettings)


def cli_auth(local_name: str = "admin") -> BearerTokenFile:
    """The CLI's credentials: SLMOPS_AUTH_TOKEN_FILE, else the local stack's ``local_name``
    token (``admin``; the fleet simulator uses ``simulator``)."""
    settings = CliSettings()
    return BearerTokenFile(settings.auth.token_path(settings.var_dir, local_name))


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` to stderr and exit 1 (no traceback)."""
    console_err.print(f"error: {message}", markup=False, style="red")
    raise typer.Exit(1)


class CliError(Exception):
    """Printed as ``error: <message>``, exit 1, no traceback."""


class HttpError(CliError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


ServiceName = Literal["registry", "optimizer", "rollout", "telemetry"]


@dataclass(frozen=True)
class _Service:
    label: str  # as messages name it
    setting: str  # the CliSettings field with its URL

    @property
    def env_var(self) -> str:
        return f"SLMOPS_{self.setting.upper()}"

    def default_url(self) -> str:
        return str(getattr(CliSettings(), self.setting))


_SERVICES: dict[ServiceName, _Service] = {
    "registry": _Service("registry", "registry_url"),
    "optimizer": _Service("optimizer", "optimizer_url"),
    "rollout": _Service("rollout service", "rollout_url"),
    "telemetry": _Service("telemetry service", "telemetry_url"),
}


def error_detail(response: httpx.Response) -> str:
    """A service's error answer as one readable message (with its HTTP status)."""
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


class ServiceClient(httpx.Client):
    """The CLI's HTTP client to one of the platform's services, with the CLI's credentials:
    an unreachable service and 4xx/5xx answers become :class:`CliError`.

    (Services call each other with :class:`slmops.service.registry_api.RegistryClient`, async
    and with their own identity; this one is the person at the terminal's.)"""

    def __init__(self, service: ServiceName, url: str | None = None) -> None:
        self.service = _SERVICES[service]
        self.url = (url or self.service.default_url()).rstrip("/")
        super().__init__(base_url=self.url, timeout=TIMEOUT, auth=cli_auth())

    def call(self, method: str, path: str, *, slow: bool = False, **kwargs: Any) -> httpx.Response:
        """One request; ``slow`` allows an hour for the answer (big uploads are checked)."""
        try:
            response = self.request(method, path, timeout=SLOW_TIMEOUT if slow else TIMEOUT,
                                    **kwargs)  # fmt: skip
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise CliError(
                f"{self.service.label} not reachable at {self.url}: start it with `slmops up` "
                f"or set {self.service.env_var}"
            ) from exc
        except httpx.HTTPError as exc:
            raise CliError(f"{self.service.label} at {self.url} failed: {exc!r}") from exc
        except MissingTokenError as exc:
            raise CliError(str(exc)) from None
        if response.is_error:
            raise HttpError(response.status_code, error_detail(response))
        return response


def call_json(service: ServiceName, method: str, path: str, url: str | None, **kwargs: Any) -> Any:
    """One call to ``service``'s API, its JSON answer; any failure exits with its message."""
    try:
        with ServiceClient(service, url) as client:
            return client.call(method, path, **kwargs).json()
    except CliError as exc:
        fail(str(exc))


RegistryUrl = Annotated[
    str | None,
    typer.Option(
        "--registry-url",
        help="Registry base URL (default: $SLMOPS_REGISTRY_URL, else http://127.0.0.1:8101).",
        show_default=False,
    ),
]
OptimizerUrl = Annotated[
    str | None,
    typer.Option(
        "--optimizer-url",
        help="Optimizer base URL (default: $SLMOPS_OPTIMIZER_URL, else http://127.0.0.1:8102).",
        show_default=False,
    ),
]
RolloutUrl = Annotated[
    str | None,
    typer.Option(
        "--rollout-url",
        help="Rollout service URL (default: $SLMOPS_ROLLOUT_URL, else http://127.0.0.1:8104).",
        show_default=False,
    ),
]
TelemetryUrl = Annotated[
    str | None,
    typer.Option(
        "--telemetry-url",
        help="Telemetry service URL (default: $SLMOPS_TELEMETRY_URL, else http://127.0.0.1:8107).",
        show_default=False,
    ),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print the JSON the service answered.")]


def validated(kind: Any, value: str, what: str) -> str:
    """``value`` checked against the platform's own pattern for ``kind``, before any call."""
    try:
        return str(TypeAdapter(kind).validate_python(value))
    except ValidationError as exc:
        fail(f"invalid {what} {value!r}: {exc.errors()[0]['msg']}")


def parse_shares(text: str, what: str) -> dict[str, float]:
    """``a=0.5,b=0.5`` (or ``a,b``: equal shares)."""
    shares: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        try:
            shares[key] = float(value) if value else 1.0
        except ValueError:
            fail(f"{what}: {part!r} is not NAME=SHARE")
    return shares


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration_s(text: str) -> float:
    """``90s``, ``15m``, ``8h``, ``30d`` (or plain seconds) as seconds."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:], 0)
    try:
        value = float(text[:-1] if unit else text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a duration like 15m, 8h or 30d") from None
    seconds = value * (unit or 1)
    if seconds <= 0:
        raise typer.BadParameter("a token must live a positive time")
    return seconds
