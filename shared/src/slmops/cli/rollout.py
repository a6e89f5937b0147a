"""`slmops rollout start|status|approve|pause|resume|cancel|rollback NAME VERSION` and
`slmops rollout list`: staged rollouts through the rollout service's API, found by model name
and version. `slmops rollout proposals|approve RELEASE_ID|reject RELEASE_ID`: releases proposed
from field evidence (``proposals.py``)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from slmops.cli import proposals
from slmops.cli.common import JsonOutput, RolloutUrl, call_json, console_out, fail
from slmops.cli.render import text_row

app = typer.Typer(help="Staged rollouts to the fleet, gated by on-device health.",
                  no_args_is_help=True)  # fmt: skip
Name = Annotated[str, typer.Argument(help="Model name.")]
Version = Annotated[str, typer.Argument(help="Model version (its release is rolled out).")]
RolloutId = Annotated[
    str | None,
    typer.Option("--rollout-id", help="Which rollout, when the version has several "
                 "(different selectors)."),
]  # fmt: skip
Reason = Annotated[str, typer.Option("--reason", help="Why, kept with the rollout.")]


def _pairs(values: list[str], what: str) -> dict[str, str]:
    bad = [v for v in values if "=" not in v]
    if bad:
        fail(f"{what} must be key=value, not {bad}")
    return dict(v.split("=", 1) for v in values)


@app.command()
def start(
    name: Name,
    version: Version,
    selector: Annotated[list[str], typer.Option(help="key=value a gateway's labels must "
                                                "have (repeatable).")] = [],  # noqa: B006
    percents: Annotated[str, typer.Option(help="Cumulative % per wave.")] = "1,10,50,100",
    soak_s: Annotated[float, typer.Option(help="Health gates must hold this long per wave.")] = 60,
    approval_wave: Annotated[list[int], typer.Option(help="A wave that waits for "
                                                     "`approve` (repeatable).")] = [],  # noqa: B006
    rollback_scope: Annotated[str, typer.Option(help="gateways or fleet.")] = "gateways",
    policy: Annotated[str, typer.Option(help="More policy fields as JSON, e.g. "
                                        '\'{"max_rate_per_min": 1000}\'.')] = "{}",
    overlay: Annotated[list[str], typer.Option(help="SELECTOR:SETTING=N, e.g. "
                                               "site=paris:intra_op_threads=2.")] = [],  # noqa: B006
    json_output: JsonOutput = False,
    rollout_url: RolloutUrl = None,
) -> None:  # fmt: skip
    """Start rolling out a version's release in waves."""
    try:
        extra = json.loads(policy)
        wave_percents = [float(p) for p in percents.split(",")]
    except ValueError as exc:
        fail(f"--policy must be a JSON object and --percents numbers: {exc}")
    body = {
        "model_name": name, "version": version, "selector": _pairs(selector, "--selector"),
        "policy": {"percents": wave_percents, "soak_s": soak_s, "approval_waves": approval_wave,
                   "rollback_scope": rollback_scope, **extra},
        "overlays": [_overlay(o) for o in overlay],
    }  # fmt: skip
    result = call_json("rollout", "POST", "/v1/rollouts", rollout_url, json=body)
    if json_output:
        print(json.dumps(result, indent=2))
        return
    console_out.print(f"rollout {result['rollout_id']} of {name} {version}: {result['status']}, "
               f"waves of {result['waves']} gateways"
               + (f" ({result['reason']})" if result.get("reason") else ""),
               markup=False)  # fmt: skip
    _print_skipped(result)


def _overlay(text: str) -> dict[str, Any]:
    labels, _, settings = text.rpartition(":")
    pairs = _pairs(settings.split(","), "--overlay settings")
    try:
        values = {k: int(v) for k, v in pairs.items()}
    except ValueError:
        fail(f"--overlay settings are whole numbers: {text}")
    return {"selector": _pairs([s for s in labels.split(",") if s], "--overlay selector"),
            "settings": values}  # fmt: skip


@app.command()
def status(
    name: Name, version: Version, json_output: JsonOutput = False, rollout_url: RolloutUrl = None
) -> None:
    """Each rollout of the version: its waves' progress and what the gates say next."""
    params = {"model_name": name, "version": version}
    found = call_json("rollout", "GET", "/v1/rollouts", rollout_url, params=params)
    if json_output:
        print(json.dumps(found, indent=2))
        return
    if not found:
        fail(f"no rollout of {name} {version}: start one with `slmops rollout start`")
    for rollout in found:
        _print_status(rollout)


@app.command("list")
def list_rollouts(
    name: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    json_output: JsonOutput = False,
    rollout_url: RolloutUrl = None,
) -> None:
    """Every rollout, newest first: model, version, status, waves and gateway counts."""
    params = {"model_name": name} if name else {}
    found = call_json("rollout", "GET", "/v1/rollouts", rollout_url, params=params)
    if json_output:
        print(json.dumps(found, indent=2))
        return
    if not found:
        console_out.print("no rollouts", markup=False)
        return
    table = Table(title="rollouts, newest first", title_justify="left")
    for column in ("rollout", "model", "version", "status", "wave", "gateways"):
        table.add_column(column, no_wrap=column == "rollout")
    for r in found:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r["gateways"].items()))
        wave = f"{r['wave_index'] + 1}/{len(r['waves'])}" if r["waves"] else "-"
        table.add_row(*text_row(r["rollout_id"], r["model_name"], r["version"], r["status"],
                                wave, counts))  # fmt: skip
    console_out.print(table, soft_wrap=False)


def _print_skipped(r: dict[str, Any]) -> None:
    """The classes of the release this rollout gives nothing, and why."""
    for device_class, why in sorted((r.get("skipped_classes") or {}).items()):
        console_out.print(f"  {device_class}: nothing rolled out - {why}", markup=False)


def _print_status(r: dict[str, Any]) -> None:
    head = f"rollout {r['rollout_id']} of {r['model_name']} {r['version']}: {r['status']}"
    console_out.print(head + (f" ({r['reason']})" if r.get("reason") else ""), markup=False)
    _print_skipped(r)
    if not r.get("wave_progress"):
        return  # waiting for gateways: no waves yet
    table = Table(title_justify="left")
    columns = ("wave", "targets", "pending", "assigned", "acknowledged", "applied", "failed",
               "rolled back")  # fmt: skip
    for column in columns:
        table.add_column(column)
    for wave in r["wave_progress"]:
        g = wave["gateways"]
        marker = " <" if wave["index"] == r["wave_index"] and r["status"] != "completed" else ""
        table.add_row(*text_row(
            f"{wave['index']}{marker}", wave["targets"], g.get("pending", 0),
            g.get("assigned", 0), g.get("acknowledged", 0), g.get("applied", 0),
            g.get("failed", 0), g.get("rolled_back", 0),
        ))  # fmt: skip
    console_out.print(table, soft_wrap=False)
    current, gates = r["current_wave"], r["gates"]
    console_out.print(f"current wave: {current['applied']} applied, {current['failed']} failed, "
               f"{current['silent']} silent of {current['targets']}; next: "
               f"{gates['next_step']} - {gates['why']}")  # fmt: skip


def _control(action: str) -> Any:
    def command(
        name: Name, version: Version, reason: Reason = "", rollout_id: RolloutId = None,
        json_output: JsonOutput = False, rollout_url: RolloutUrl = None,
    ) -> None:  # fmt: skip
        chosen = rollout_id or _only_rollout(name, version, rollout_url)
        result = call_json("rollout", "POST", f"/v1/rollouts/{chosen}/{action}", rollout_url,
                       json={"reason": reason})  # fmt: skip
        if json_output:
            print(json.dumps(result, indent=2))
            return
        _print_status(result)

    command.__doc__ = {
        "pause": "Hold the rollout in its current wave.",
        "resume": "Carry on after a pause (or an automatic rollback).",
        "cancel": "Stop the rollout: nothing more is assigned (gateways keep what they run).",
        "approve": "Let the next wave start (for waves the policy holds for approval).",
        "rollback": "Roll every gateway the rollout reached back to what it ran (signed).",
    }[action]
    return command


for _action in ("pause", "resume", "cancel", "rollback"):
    app.command(_action)(_control(_action))
app.command("proposals")(proposals.list_proposals)
app.command("reject")(proposals.reject)


@app.command()
def approve(
    name_or_release: Annotated[str, typer.Argument(
        metavar="NAME|RELEASE_ID",
        help="A model name and its VERSION: let its rollout's next wave start. A proposed "
        "release's id alone (see `slmops rollout proposals`): approve it, its rollout starts.",
    )],
    version: Annotated[str | None, typer.Argument(help="Model version (with NAME).")] = None,
    reason: Reason = "",
    rollout_id: RolloutId = None,
    policy: Annotated[str, typer.Option(help="A proposal's wave policy as JSON (default: "
                                        "the normal one).")] = "",
    json_output: JsonOutput = False,
    rollout_url: RolloutUrl = None,
) -> None:  # fmt: skip
    """Let a rollout's next wave start, or approve a release proposed from field evidence."""
    if version is None:
        proposals.approve_proposal(name_or_release, reason, policy, json_output, rollout_url)
        return
    _control("approve")(name_or_release, version, reason, rollout_id, json_output, rollout_url)


def _only_rollout(name: str, version: str, url: str | None) -> str:
    params = {"model_name": name, "version": version}
    found = call_json("rollout", "GET", "/v1/rollouts", url, params=params)
    if not found:
        fail(f"no rollout of {name} {version}: start one with `slmops rollout start`")
    if len(found) > 1:
        ids = ", ".join(r["rollout_id"] for r in found)
        fail(f"{name} {version} has {len(found)} rollouts ({ids}): choose with --rollout-id")
    return str(found[0]["rollout_id"])
