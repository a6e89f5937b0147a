"""`slmops rollout proposals`, `slmops rollout approve RELEASE_ID`, `slmops rollout reject
RELEASE_ID --reason ...`: releases proposed from field evidence (a class's figures broke its
budget, a re-optimization found a better variant), held by the rollout service until an
operator decides."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from slmops.cli.common import JsonOutput, RolloutUrl, call_json, console_out, fail
from slmops.cli.render import text_row

ReleaseId = Annotated[str, typer.Argument(help="The proposed release's id (rel-field-...).")]


def list_proposals(
    status: Annotated[
        str | None, typer.Option(help="Only this status: pending, approved, rejected, failed.")
    ] = None,
    name: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    json_output: JsonOutput = False,
    rollout_url: RolloutUrl = None,
) -> None:
    """Releases proposed from field evidence, newest first: the finding and the new variant."""
    params = {k: v for k, v in {"status": status, "model_name": name}.items() if v}
    found = call_json("rollout", "GET", "/v1/proposals", rollout_url, params=params)
    if json_output:
        print(json.dumps(found, indent=2))
        return
    if not found:
        console_out.print("no proposed releases", markup=False)
        return
    table = Table(title="releases proposed from field evidence, newest first",
                  title_justify="left")  # fmt: skip
    for column in ("release", "status", "model", "class", "field vs budget", "variant", "why"):
        table.add_column(column, no_wrap=column == "release")
    for p in found:
        table.add_row(*text_row(
            p["release_id"], _status(p), f"{p['model_name']} {p['version']}",
            p["evidence"]["device_class"], _evidence(p["evidence"]),
            f"{p['evidence']['variant_id']} -> {p.get('proposed_variant_id') or '(none)'}",
            _why(p),
        ))  # fmt: skip
    console_out.print(table, soft_wrap=False)


def _status(p: dict[str, Any]) -> str:
    if p.get("decided_by"):
        return f"{p['status']} by {p['decided_by']}"
    return str(p["status"])


def _evidence(e: dict[str, Any]) -> str:
    bound = "<=" if e["bound"] == "max" else ">="
    host = e.get("host_value")
    host_text = "not measurable on the host" if host is None else f"host {host:g}"
    return f"{e['metric']} {e['field_value']:g} (budget {bound} {e['budget']:g}; {host_text})"


def _why(p: dict[str, Any]) -> str:
    if p["status"] == "failed":
        return "; ".join(f"{c}: {r}" for c, r in sorted(p.get("reasons", {}).items()))
    reason = p.get("decision_reason")
    return str(p.get("why", "")) + (f" / decision: {reason}" if reason else "")


def approve_proposal(
    release_id: str, reason: str, policy: str, json_output: bool, rollout_url: str | None
) -> None:
    """Approve a proposal: the rollout service starts its rollout (the same one if approved)."""
    try:
        chosen = json.loads(policy) if policy else None
    except ValueError as exc:
        fail(f"--policy must be a JSON object: {exc}")
    body = {"reason": reason, "policy": chosen}
    result = call_json("rollout", "POST", f"/v1/proposals/{release_id}/approve", rollout_url,
                       json=body)  # fmt: skip
    if json_output:
        print(json.dumps(result, indent=2))
        return
    proposal, rollout = result["proposal"], result.get("rollout") or {}
    console_out.print(
        f"{release_id} approved by {proposal['decided_by']}: rollout "
        f"{rollout.get('rollout_id')} {rollout.get('status')}, waves of {rollout.get('waves')} "
        f"gateways of class {proposal['evidence']['device_class']} running "
        f"{proposal['model_name']}", markup=False,
    )  # fmt: skip


def reject(
    release_id: ReleaseId,
    reason: Annotated[str, typer.Option("--reason", help="Why (required), kept with it.")],
    json_output: JsonOutput = False,
    rollout_url: RolloutUrl = None,
) -> None:
    """Reject a release proposed from field evidence: it never rolls out."""
    result = call_json("rollout", "POST", f"/v1/proposals/{release_id}/reject", rollout_url,
                       json={"reason": reason})  # fmt: skip
    if json_output:
        print(json.dumps(result, indent=2))
        return
    proposal = result["proposal"]
    console_out.print(f"{release_id} rejected by {proposal['decided_by']}: {reason}",
                      markup=False)  # fmt: skip
