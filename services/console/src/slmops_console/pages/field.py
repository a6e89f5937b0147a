"""The fleet's field health: per model version, each variant's figures on each device class
merged over its gateways (the telemetry service's view) against the class's budgets and what
the validator measured on its host, drift against the validation baseline, and the findings.

The telemetry service is optional to the console: when it is not configured or does not
answer, the page says so in words (the Gateways tab still works)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from slmops_console.pages.fleet import VariantNames
from slmops_console.rendering import UpstreamDep, render
from slmops_console.session import Session, SignedIn
from slmops_console.upstream import Upstream, UpstreamError
from slmops_console.views import field as field_view

router = APIRouter(include_in_schema=False)

#: Versions judged on one page (one telemetry call each); narrower with ``?model=``.
MAX_VERSIONS = 8


@dataclass
class ClassRow:
    variant_id: str
    variant_name: str
    device_class: str
    span: str
    windows: int
    figures: list[field_view.Figure]
    breaches: int
    drift: field_view.Drift
    by_labels: list[tuple[str, dict[str, Any]]]
    problem: str = ""  # why budgets are missing


@dataclass
class VersionHealth:
    model_name: str
    version: str
    classes: list[ClassRow] = field(default_factory=list)
    problem: str = ""  # why this version's rows are not judged


def _recipe(name: str, row: dict[str, Any]) -> str:
    """A variant's name under its version's heading: without the model and version."""
    return name.removeprefix(f"{row['model_name']} {row['version']} · ")


def class_row(row: dict[str, Any], names: dict[str, str]) -> ClassRow:
    """A telemetry ``ClassHealth`` (or a bare ``FieldRow``: no gates, no drift) as shown."""
    gates = row.get("gates") or []
    figures = field_view.figures(row["figures"], gates, field_view.host_from_gates(gates))
    labels = [(", ".join(f"{k}={v}" for k, v in sorted(part["labels"].items())) or "no labels",
               part["figures"]) for part in row.get("by_labels") or []]  # fmt: skip
    return ClassRow(
        variant_id=row["variant_id"],
        variant_name=_recipe(names.get(row["variant_id"], row["variant_id"]), row),
        device_class=row["device_class"], windows=row.get("windows", 0),
        span=field_view.span(row.get("since"), row.get("until")),
        figures=figures, breaches=field_view.breaches(figures),
        drift=field_view.drift(row.get("drift")), by_labels=labels,
        problem=row.get("expectations_error") or "",
    )  # fmt: skip


def _unavailable(exc: UpstreamError) -> str:
    if exc.status == 503 and "not configured" in exc.detail:
        return ("The console is not configured to reach the telemetry service "
                "(SLMOPS_CONSOLE_TELEMETRY_URL): field figures cannot be shown.")  # fmt: skip
    return (f"The telemetry service did not answer ({exc.detail}): field figures cannot be "
            "shown now. The gateways' last reports are on the Gateways tab.")  # fmt: skip


async def field_health(
    upstream: Upstream, session: Session, names: VariantNames, model: str = ""
) -> dict[str, Any]:
    """The page's context: ``versions`` (judged per class), ``findings``, or ``problem``."""
    try:
        rows = await upstream.get("telemetry", "/v1/fleet/health", session, model=model or None)
        findings = await upstream.get(
            "telemetry", "/v1/fleet/findings", session, model=model or None
        )
    except UpstreamError as exc:
        if exc.status == 401:
            raise  # signed out: to the sign-in page
        return {"versions": [], "findings": [], "problem": _unavailable(exc), "more": 0,
                "models": []}  # fmt: skip
    newest: dict[tuple[str, str], str] = {}
    for row in rows:
        key = (row["model_name"], row["version"])
        newest[key] = max(newest.get(key, ""), str(row.get("until") or ""))
    chosen = sorted(newest, key=lambda k: (newest[k], k), reverse=True)[:MAX_VERSIONS]
    judged = await asyncio.gather(
        *(upstream.get("telemetry", f"/v1/fleet/health/{m}/{v}", session) for m, v in chosen),
        return_exceptions=True,
    )
    variant_ids = sorted({row["variant_id"] for row in rows})
    shown = await names.names(variant_ids, session, upstream)
    versions = []
    for (model_name, version), answer in zip(chosen, judged, strict=True):
        health = VersionHealth(model_name, version)
        if isinstance(answer, BaseException) and not isinstance(answer, UpstreamError):
            raise answer
        if isinstance(answer, UpstreamError):
            # not judged (no budgets): the bare figures still show, and why
            health.problem = f"not judged against the budgets: {answer}"
            answer = [r for r in rows if (r["model_name"], r["version"]) == (model_name, version)]
        health.classes = [class_row(r, shown) for r in answer]
        health.classes.sort(key=lambda c: (c.device_class, c.variant_name))
        versions.append(health)
    return {
        "versions": versions,
        "findings": [field_view.finding(f) for f in findings],
        "problem": "",
        "more": len(newest) - len(chosen),
        "models": sorted({m for m, _ in newest}),
    }


@router.get("/fleet/field", response_class=HTMLResponse)
async def fleet_field(
    request: Request, session: SignedIn, upstream: UpstreamDep, model: str = ""
) -> HTMLResponse:
    names: VariantNames = request.app.state.variant_names
    context = await field_health(upstream, session, names, model)
    return render(request, "field.html", session, nav="fleet", model=model, **context)
