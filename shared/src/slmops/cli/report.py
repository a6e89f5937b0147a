"""`slmops report VARIANT_ID`: the newest validation report of a variant, from the registry."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from slmops.cli.common import RegistryUrl, call_json, fail, validated
from slmops.events.payloads import Token
from slmops.reports import ValidationReport, render_markdown


def report(
    variant_id: Annotated[str, typer.Argument(help="The variant id (see `slmops variants`).")],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the report JSON as the validator wrote it.")
    ] = False,
    registry_url: RegistryUrl = None,
) -> None:
    """Show the newest validation report of a variant: verdict, then every gate vs its budget."""
    variant_id = validated(Token, variant_id, "variant id")
    body: dict[str, Any] = call_json(
        "registry", "GET", f"/v1/variants/{variant_id}/report", registry_url
    )
    if json_output:
        print(json.dumps(body["report"], indent=2))
        return
    try:
        parsed = ValidationReport.model_validate(body["report"])
    except ValidationError as exc:
        fail(f"the stored report of {variant_id} is not a validation report: {exc}")
    print(render_markdown(parsed), end="")
    print(f"\nSigned report manifest: {body['manifest'].get('digest')}")
