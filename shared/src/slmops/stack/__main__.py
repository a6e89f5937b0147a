"""``python -m slmops.stack up|down|status``: the stack commands without the full `slmops` CLI."""

from __future__ import annotations

import typer

from slmops.cli import stack

app = typer.Typer(
    help="The slmops local stack (NATS, S3, services) on 127.0.0.1.",
    no_args_is_help=True,
    add_completion=False,
)
app.command("up")(stack.up)
app.command("down")(stack.down)
app.command("status")(stack.status)
app.command("supervise", hidden=True)(stack.supervise)

if __name__ == "__main__":
    app()
