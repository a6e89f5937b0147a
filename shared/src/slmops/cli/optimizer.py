"""`slmops variants` (from the registry's lineage) and `slmops jobs` (the optimizer's API)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from slmops.cli.common import (
    JsonOutput,
    OptimizerUrl,
    RegistryUrl,
    call_json,
    console_err,
    console_out,
)
from slmops.cli.registry import fetch_lineage
from slmops.cli.render import local_time, text_row, variants_table


def variants(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Model version.")],
    json_output: JsonOutput = False,
    registry_url: RegistryUrl = None,
) -> None:
    """List the variants of a model version: class, recipe, size, quality and verdict."""
    doc = fetch_lineage(registry_url, name, version)
    if json_output:
        print(json.dumps(doc.get("variants", []), indent=2))
        return
    if not doc.get("variants"):
        console_err.print(f"{name} {version} has no variants yet (see `slmops jobs`)")
    else:
        console_out.print(variants_table(doc), soft_wrap=False)
    for failure in doc.get("optimization_failures") or []:
        console_out.print(
            f"failed: {failure.get('device_class')} / {failure.get('recipe_name')}: "
            f"{failure.get('reason')}",
            markup=False,
        )


def jobs(
    model: Annotated[str | None, typer.Option(help="Only jobs of this model.")] = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    json_output: JsonOutput = False,
    optimizer_url: OptimizerUrl = None,
) -> None:
    """List optimization jobs with their state and progress, newest first."""
    params = {k: v for k, v in (("model", model), ("state", state)) if v}
    records = call_json("optimizer", "GET", "/v1/jobs", optimizer_url, params=params)
    if json_output:
        print(json.dumps(records, indent=2))
        return
    table = Table(title="optimization jobs", title_justify="left")
    for column in ("job (variant id)", "model", "class", "recipe", "state", "progress", "step"):
        table.add_column(column)
    for r in records:
        progress = f"{100 * float(r.get('progress') or 0):.0f}%"
        step = r.get("error") or r.get("step") or ""
        table.add_row(
            *text_row(
                r.get("job_id"),
                f"{r.get('model_name')} {r.get('version')}",
                r.get("device_class"),
                r.get("recipe_name"),
                r.get("state"),
                progress,
                f"{step} ({local_time(r.get('updated_at'))})",
            )
        )
    console_out.print(table, soft_wrap=False)


def cancel(
    job_id: Annotated[str, typer.Argument(help="The job id (the variant id it would produce).")],
    optimizer_url: OptimizerUrl = None,
) -> None:
    """Cancel a queued or running optimization job."""
    record = call_json("optimizer", "POST", f"/v1/jobs/{job_id}/cancel", optimizer_url)
    console_out.print(f"cancel requested for {record.get('job_id')} (state {record.get('state')})")
