"""Turning registry JSON into rich renderables for the terminal (lineage, short digests)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.table import Table
from rich.text import Text
from rich.tree import Tree


def short_digest(digest: object) -> str:
    return str(digest)[:19] if digest else ""


def local_time(value: object) -> str:
    return str(value or "")[:19].replace("T", " ")


def _size(size: object) -> str:
    if not isinstance(size, int | float):
        return ""
    amount, unit = float(size), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if amount < 1024:
            break
        amount, unit = amount / 1024, bigger
    return f"{amount:.0f} B" if unit == "B" else f"{amount:.1f} {unit}"


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_dicts(value: object) -> list[dict[str, Any]]:
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [item for item in items if isinstance(item, dict)]


def text_row(*cells: object) -> list[Text]:
    return [Text("" if cell is None else str(cell)) for cell in cells]


def _verdict(reports: list[dict[str, Any]]) -> str:
    if not reports:
        return ""
    last = reports[-1]
    gates = [g for g in as_dicts(last.get("gates")) if g.get("passed") is not None]
    failed = [str(g.get("name")) for g in gates if g.get("passed") is False]
    text = f"{last.get('verdict', '?')} ({len(gates) - len(failed)}/{len(gates)} gates passed"
    text += f"; failed {', '.join(failed)})" if failed else ")"
    return text + (f": {last['reason']}" if last.get("reason") else "")


def _quality(metrics: dict[str, Any]) -> str:
    """The optimizer's quick score of a variant against its fp32 parent, if measured."""
    for key, label in (("quick_cosine_mean", "cosine"), ("quick_top1_agreement", "top-1")):
        if isinstance(metrics.get(key), int | float):
            return f"{label} {metrics[key]:.4f}"
    return ""


def variants_table(doc: dict[str, Any]) -> Table:
    """The variants of a lineage document: class, recipe, size, quick quality, verdict."""
    gateways = as_dicts(doc.get("gateways"))
    applied = Counter(g.get("variant_id") for g in gateways if g.get("state") == "applied")
    failed = Counter(g.get("variant_id") for g in gateways if g.get("state") == "failed")
    table = Table(title="variants", title_justify="left")
    columns = ("variant", "class", "recipe", "size", "quality", "status", "verdict", "gateways")
    for column in columns:
        table.add_column(column)
    for v in as_dicts(doc.get("variants")):
        status, vid, failure = str(v.get("status", "")), v.get("variant_id"), v.get("failure")
        if failure:
            status += f": {_dict(failure).get('reason', failure)}"
        fleet = f"{applied[vid]}" + (f" ({failed[vid]} failed)" if failed[vid] else "")
        recipe, size = _dict(v.get("recipe")).get("name"), _size(v.get("size_bytes"))
        quality = _quality(_dict(v.get("metrics")))
        verdict = _verdict(as_dicts(v.get("reports")))
        table.add_row(
            *text_row(vid, v.get("device_class"), recipe, size, quality, status, verdict, fleet)
        )
    return table


def render_lineage(doc: dict[str, Any]) -> Tree:
    """The lineage JSON as a rich tree; any missing part is left out."""
    tree = Tree(Text(f"{doc.get('model_name', '?')} {doc.get('version', '?')}", style="bold"))
    if published := _dict(doc.get("published")):
        art = _dict(published.get("artifact"))
        manifest, digest = (
            short_digest(published.get("manifest_digest")),
            short_digest(art.get("digest")),
        )
        what = f"manifest {manifest}, artifact {digest} ({_size(art.get('size_bytes'))})"
        tree.add(Text(f"published {local_time(published.get('time'))}: {what}"))
    gateways = as_dicts(doc.get("gateways"))
    applied = Counter(g.get("variant_id") for g in gateways if g.get("state") == "applied")
    failed = Counter(g.get("variant_id") for g in gateways if g.get("state") == "failed")
    if as_dicts(doc.get("variants")):
        tree.add(variants_table(doc))
    if failures := as_dicts(doc.get("optimization_failures")):
        node = tree.add(Text("optimization failures"))
        for f in failures:
            node.add(Text(f"{f.get('device_class')} / {f.get('recipe_name')}: {f.get('reason')}"))
    if releases := as_dicts(doc.get("releases")):
        node = tree.add(Text("releases"))
        for release in releases:
            when = f" ({local_time(release['time'])})" if release.get("time") else ""
            child = node.add(Text(f"{release.get('release_id')}{when}"))
            for e in as_dicts(release.get("entries")):
                why = f": {e['reason']}" if e.get("reason") else ""
                child.add(Text(f"{e.get('device_class')} -> {e.get('variant_id') or 'none'}{why}"))
    if no_release := _dict(doc.get("release_failed")):  # judged in full, nothing to ship
        when = f" ({local_time(no_release['time'])})" if no_release.get("time") else ""
        node = tree.add(Text(f"no release{when}: no device class has a variant"))
        for e in as_dicts(no_release.get("entries")):
            node.add(Text(f"{e.get('device_class')}: {e.get('reason') or 'no reason given'}"))
    if rollouts := as_dicts(doc.get("rollouts")):
        node = tree.add(Text("rollouts"))
        for r in rollouts:
            waves = ", ".join(f"{w.get('percent')}%" for w in as_dicts(r.get("waves"))) or "-"
            steps, state = len(r.get("history") or []), r.get("state") or "?"
            what = f"{r.get('rollout_id')} of release {r.get('release_id')}: {state}"
            node.add(Text(f"{what} (waves {waves}; {steps} steps)"))
    if gateways:
        counts = f"{sum(applied.values())} applied, {sum(failed.values())} failed"
        tree.add(Text(f"gateways: {len(gateways)} ({counts})"))
    return tree
