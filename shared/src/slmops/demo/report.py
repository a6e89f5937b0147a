"""The demo's final report: per model and class, the chosen variant against fp32 (size,
latency, quality, from its signed validation report), the rollout's outcome, which gateways
run what (the registry's lineage), and the trace to look at."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from slmops.cli.common import cli_auth
from slmops.cli.render import as_dicts
from slmops.demo.flow import DemoOptions, DemoRun
from slmops.demo.journey import Journey

_QUALITY = (
    "parity.cosine_mean",
    "parity.top1_agreement",
    "parity.perplexity_increase_pct",
    "generation.greedy_identical_share",
)


def _gates(report: dict[str, Any]) -> dict[str, Any]:
    return {g["name"]: g.get("value") for c in report.get("checks", []) for g in c.get("gates", [])}


def _evidence(report: dict[str, Any], check: str) -> dict[str, Any]:
    found = [c.get("evidence") or {} for c in report.get("checks", []) if c.get("name") == check]
    return found[0] if found else {}


def variant_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Size, latency and quality of a variant beside its fp32 reference (a decoder's latency:
    time to first token and decode tokens/s, from its generation check)."""
    size, latency, gates = _evidence(report, "size"), _evidence(report, "latency"), _gates(report)
    timing = ("latency", "generation")
    notes = [n for c in report.get("checks", []) if c.get("name") in timing for n in c["notes"]]
    generation = _evidence(report, "generation")
    decoding: dict[str, Any] = {}
    if generation.get("candidate_ttft_p50_ms") is not None:
        decoding = {
            "ttft_ms": generation["candidate_ttft_p50_ms"],
            "fp32_ttft_ms": generation.get("reference_ttft_p50_ms"),
            "decode_tokens_per_s": 1000.0 / generation["candidate_tpot_p50_ms"],
            "fp32_decode_tokens_per_s": 1000.0 / generation["reference_tpot_p50_ms"],
        }
    return {
        **decoding,
        "recipe": report.get("recipe_name"),
        "verdict": report.get("verdict"),
        "size_mb": size.get("size_mb"),
        "fp32_size_mb": size.get("fp32_size_mb"),
        "smaller_than_fp32_x": size.get("smaller_than_fp32_x"),
        "p50_ms": latency.get("candidate_p50_ms"),
        "fp32_p50_ms": latency.get("reference_p50_ms"),
        "p50_ratio": latency.get("p50_ratio"),
        "quality": {name: gates[name] for name in _QUALITY if gates.get(name) is not None},
        "latency_note": notes[0] if notes else "",
    }


async def _get(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    answer = await http.get(url)
    return answer.json() if answer.is_success else {}


async def build_report(run: DemoRun, options: DemoOptions) -> dict[str, Any]:
    """The report as JSON (``--json-report``; also what the table shows)."""
    models = []
    async with httpx.AsyncClient(timeout=30.0, auth=cli_auth()) as http:
        for key, journey in run.journeys.items():
            models.append(await _model_report(http, options, key, journey))
    return {"version": options.version, "run": options.run_id, "gateways": options.gateways,
            "classes": options.classes, "models": models, "chat": run.chat}  # fmt: skip


async def _model_report(
    http: httpx.AsyncClient, options: DemoOptions, key: str, journey: Journey
) -> dict[str, Any]:
    registry = options.registry_url
    running = await _running(http, registry, journey)
    classes = []
    for entry in journey.release.entries if journey.release else []:
        row: dict[str, Any] = {"device_class": entry.device_class, "variant_id": entry.variant_id,
                               "reason": entry.reason}  # fmt: skip
        if entry.variant_id:
            body = await _get(http, f"{registry}/v1/variants/{entry.variant_id}/report")
            row.update(variant_figures(body.get("report") or {}))
            row["gateways_running"] = running.get(entry.variant_id, 0)
        classes.append(row)
    rollout = {}
    if journey.rollout_id:
        rollout = await _get(http, f"{options.rollout_url}/v1/rollouts/{journey.rollout_id}")
    return {
        "key": key, "model_name": journey.model_name, "version": journey.version,
        "trace_id": journey.trace_id, "classes": classes,
        "optimization_failures": journey.failures,
        "rollout": {
            "rollout_id": journey.rollout_id, "outcome": journey.outcome,
            "reason": journey.outcome_reason or rollout.get("reason", ""),
            "waves": journey.waves, "targets": journey.targets,
            "acknowledged": len(journey.acknowledged), "applied": len(journey.applied),
            "failed": len(journey.failed), "last_acknowledged_at": journey.last_ack_at,
            "gateways": rollout.get("gateways", {}),
        },
        "lineage_gateways": running,
    }  # fmt: skip


async def _running(
    http: httpx.AsyncClient, registry: str, journey: Journey, settle_s: float = 15.0
) -> dict[str, int]:
    """Gateways running each variant, from the registry's lineage - read until it holds every
    ``applied`` report the demo saw (the registry projects them a moment after they pass)."""
    url = f"{registry}/v1/models/{journey.model_name}/{journey.version}/lineage"
    deadline = time.monotonic() + settle_s
    while True:
        lineage = await _get(http, url)
        running: dict[str, int] = {}
        for gateway in as_dicts(lineage.get("gateways")):  # by gateway id
            if gateway.get("state") == "applied":
                running[gateway["variant_id"]] = running.get(gateway["variant_id"], 0) + 1
        if sum(running.values()) >= len(journey.applied) or time.monotonic() > deadline:
            return running
        await asyncio.sleep(0.5)


def _vs(value: Any, reference: Any, unit: str) -> str:
    if value is None:
        return "not measured here"  # e.g. latency of another CPU's class: its canary decides
    return f"{value:.1f} {unit} (fp32 {reference:.1f})" if reference is not None else (
        f"{value:.1f} {unit}")  # fmt: skip


def render_report(report: dict[str, Any], console: Console) -> None:
    for model in report["models"]:
        table = Table(title=f"{model['model_name']} {model['version']}", title_justify="left")
        for column in (
            "class",
            "variant",
            "size",
            "latency / speed",
            "quality vs fp32",
            "gateways",
        ):
            table.add_column(column)
        for row in model["classes"]:
            if not row.get("variant_id"):
                table.add_row(row["device_class"], "none", "", "", row["reason"][:60], "0")
                continue
            quality = ", ".join(f"{k.removeprefix('parity.')} {v:.3f}"
                                for k, v in row["quality"].items())  # fmt: skip
            speed = _vs(row["p50_ms"], row["fp32_p50_ms"], "ms")
            if row.get("ttft_ms") is not None:  # a decoder: what a chat user feels
                rate = _vs(row["decode_tokens_per_s"], row["fp32_decode_tokens_per_s"], "tok/s")
                speed = f"TTFT {_vs(row['ttft_ms'], row['fp32_ttft_ms'], 'ms')}\n{rate}"
            table.add_row(row["device_class"], f"{row['recipe']}\n{row['variant_id'][:16]}",
                          _vs(row["size_mb"], row["fp32_size_mb"], "MB"), speed, quality,
                          str(row["gateways_running"]))  # fmt: skip
        console.print(table)
        r = model["rollout"]
        waves = "/".join(str(n) for n in r["waves"]) or "-"
        console.print(f"rollout {r['rollout_id']}: {r['outcome']} - {r['applied']} applied, "
                      f"{r['failed']} failed of {r['targets']} gateways in waves {waves}"
                      + (f" ({r['reason']})" if r["reason"] else ""), markup=False)  # fmt: skip
        for failure in model["optimization_failures"]:
            console.print(f"  optimization failed: {failure}", markup=False)
        if model["trace_id"]:
            console.print(f"trace {model['trace_id']}: `slmops trace show {model['trace_id']}`",
                          markup=False)  # fmt: skip
    chat = report.get("chat")
    if chat and "answer" in chat:
        rate = chat.get("decode_tokens_per_s")
        console.print(f"chat on a real gateway: {chat['question']!r} -> {chat['answer']!r} "
                      f"(first token {chat['ttft_ms']:.0f} ms"
                      + (f", {rate:.1f} tokens/s" if rate else "") + ")", markup=False)  # fmt: skip
    elif chat:
        console.print(f"chat on a real gateway failed: {chat.get('error')}", markup=False)


def render_feedback(loops: dict[str, dict[str, Any]], console: Console) -> None:
    """The field loop per model: the finding, the candidates judged against it, the proposal
    and its rollout, and the class's field figure per variant before and after."""
    for model_name, loop in loops.items():
        if not loop["regressions"] and not loop["drifts"]:
            console.print(f"field loop {model_name}: every class within its budgets, no drift",
                          markup=False)  # fmt: skip
            continue
        table = Table(title=f"field loop {model_name}", title_justify="left")
        for column in ("class", "finding", "candidates (predicted in the field)", "proposal"):
            table.add_column(column)
        for finding in loop["regressions"]:
            cls = finding["device_class"]
            plan = next((p for p in loop["plans"].values()
                         if (p.get("field") or {}).get("device_class") == cls), None)  # fmt: skip
            release_id = plan["release_id"] if plan else None
            candidates = "\n".join(
                f"{c['recipe']}: {c['verdict']}"
                + (f" ({c['field_gate']['value']:.4g})" if (c["field_gate"] or {}).get("value")
                   is not None else "")
                for v, c in loop["candidates"].items()
                if plan and any(j["variant_id"] == v for j in plan["jobs"])
            ) or ("; ".join(plan["skipped"].values()) if plan else "not planned")  # fmt: skip
            proposal = (loop["proposals"].get(release_id) or {}) if release_id else {}
            rollout = (loop["rollouts"].get(release_id) or {}) if release_id else {}
            outcome = proposal.get("outcome", "pending")
            if rollout:
                outcome += f", rollout {rollout['outcome'] or 'running'}"
            table.add_row(cls, f"{finding['metric']} {finding['field_value']:.4g} > budget "
                          f"{finding['budget']:.4g}", candidates, outcome)  # fmt: skip
        for drift in loop["drifts"]:
            table.add_row(drift["device_class"], f"drift {drift['signal']} {drift['score']:.2f} "
                          f"> {drift['threshold']:g}", "(for the operator)", "")  # fmt: skip
        console.print(table)
        for row in loop["field_figures"]:
            figures = row["figures"]
            p95 = figures.get("latency_p95_ms")
            verdicts = ", ".join(
                f"{g['name']} {'ok' if g['passed'] else 'BREACH'}"
                for g in row.get("gates", [])
                if g.get("passed") is not None
            )
            console.print(f"  in the field now: {row['device_class']} {row['variant_id'][:16]} "
                          f"p95 {p95:.1f} ms over {figures['gateways']} gateways"
                          + (f" ({verdicts})" if verdicts else ""),
                          markup=False)  # fmt: skip
