"""``slmops``: the platform's command line. Each command group lives in its own module."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import (
    auth,
    bus,
    demo,
    fleet,
    optimizer,
    registry,
    report,
    rollout,
    stack,
    trace,
    trust,
)

app = typer.Typer(
    name="slmops",
    help="Operations for small language models on fleets of edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
schemas_app = typer.Typer(help="Event contracts as JSON Schema.", no_args_is_help=True)
app.add_typer(schemas_app, name="schemas")
jobs_app = typer.Typer(help="Optimization jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(rollout.app, name="rollout")
app.add_typer(fleet.app, name="fleet")
app.add_typer(trace.app, name="trace")
app.add_typer(auth.app, name="auth")
app.add_typer(bus.app, name="bus")
app.add_typer(trust.app, name="trust")

app.command("demo")(demo.demo)
app.command("up")(stack.up)
app.command("down")(stack.down)
app.command("status")(stack.status)
app.command("publish")(registry.publish)
app.command("models")(registry.models)
app.command("lineage")(registry.lineage)
app.command("field")(registry.field)
app.command("variants")(optimizer.variants)
app.command("report")(report.report)
jobs_app.command("list")(optimizer.jobs)
jobs_app.command("cancel")(optimizer.cancel)


@schemas_app.command("export")
def schemas_export(
    directory: Annotated[Path, typer.Argument(help="Where to write <event type>.json files.")],
) -> None:
    """Write one JSON Schema per event type (CloudEvent envelope + typed data)."""
    from slmops.events.schemas import export_schemas

    written = export_schemas(directory)
    typer.echo(f"wrote {len(written)} schemas to {directory}")


if __name__ == "__main__":
    app()
