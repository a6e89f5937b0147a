"""A version's lineage as a picture: publish -> variants per class -> reports -> release ->
rollouts -> gateways, laid out in columns from ``GET /v1/models/{name}/{version}/lineage``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

COLUMNS = ("published", "variants", "reports", "releases", "rollouts", "gateways")
NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 180, 44, 40, 14, 10


@dataclass
class Node:
    key: str
    column: int
    title: str  # first line
    detail: str  # second line
    tone: str = "neutral"  # passed | failed | running | neutral (a class, never the only cue)
    href: str | None = None
    row: int = 0

    @property
    def x(self) -> int:
        return PAD + self.column * (NODE_W + GAP_X)

    @property
    def y(self) -> int:
        return PAD + self.row * (NODE_H + GAP_Y)


@dataclass
class Picture:
    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return 2 * PAD + len(COLUMNS) * NODE_W + (len(COLUMNS) - 1) * GAP_X

    @property
    def height(self) -> int:
        rows = max((n.row for n in self.nodes), default=0) + 1
        return 2 * PAD + rows * NODE_H + (rows - 1) * GAP_Y

    def paths(self) -> list[str]:
        """SVG path data of each edge: right side of the source to left side of the target."""
        where = {n.key: n for n in self.nodes}
        out = []
        for source, target in self.edges:
            a, b = where.get(source), where.get(target)
            if a is None or b is None:
                continue
            x1, y1 = a.x + NODE_W, a.y + NODE_H // 2
            x2, y2 = b.x, b.y + NODE_H // 2
            mid = (x1 + x2) // 2
            out.append(f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}")
        return out


def _short(identifier: str, keep: int = 10) -> str:
    return identifier if len(identifier) <= keep + 2 else identifier[:keep] + "…"


def _mb(size_bytes: int | None) -> str:
    return f"{size_bytes / 1e6:.1f} MB" if size_bytes else "size unknown"


def build(lineage: dict[str, Any], running: dict[str, int] | None = None) -> Picture:
    """The picture of one lineage document (rows assigned per column, in order). ``running``:
    gateways running each variant now (the fleet's counts); without it, the lineage's own
    per-gateway states are counted."""
    picture = Picture()
    name, version = lineage["model_name"], lineage["version"]
    published = lineage.get("published") or {}
    size = (published.get("artifact") or {}).get("size_bytes")
    root = Node(
        "published", 0, f"{name} {version}", f"{published.get('format', '?')} · {_mb(size)}"
    )
    picture.nodes.append(root)
    for variant in lineage.get("variants", []):
        vid = variant["variant_id"]
        recipe = (variant.get("recipe") or {}).get("name", "?")
        picture.nodes.append(
            Node(
                f"v:{vid}",
                1,
                f"{variant['device_class']}",
                f"{recipe} · {_mb(variant.get('size_bytes'))}",
                href=f"/variants/{vid}/report",
            )
        )
        picture.edges.append(("published", f"v:{vid}"))
        reports = variant.get("reports") or []
        if reports:
            verdict = reports[-1]["verdict"]
            picture.nodes.append(
                Node(
                    f"r:{vid}",
                    2,
                    f"report: {verdict}",
                    f"{_short(vid, 14)}",
                    tone=verdict,
                    href=f"/variants/{vid}/report",
                )
            )
            picture.edges.append((f"v:{vid}", f"r:{vid}"))
    for release in lineage.get("releases", []):
        rid = release["release_id"]
        shipped = [e for e in release["entries"] if e.get("variant_id")]
        evidence = release.get("proposal")
        picture.nodes.append(
            Node(
                f"rel:{rid}",
                3,
                "proposed from the field" if evidence else "release",
                f"{evidence['device_class']}: {evidence['metric']}"
                if evidence
                else f"{len(shipped)} of {len(release['entries'])} classes",
                tone="passed" if shipped else "failed",
                href="#proposals-h" if evidence else None,
            )
        )
        for entry in shipped:
            picture.edges.append((f"r:{entry['variant_id']}", f"rel:{rid}"))
    failed = lineage.get("release_failed")
    if failed:
        picture.nodes.append(Node("rel:failed", 3, "no release", "no class passed", tone="failed"))
    counts: Counter[tuple[str, str, str]] = Counter()
    newest = lineage["rollouts"][-1]["rollout_id"] if lineage.get("rollouts") else ""
    for variant_id, count in (running or {}).items():  # now: under the newest rollout
        if count:
            counts[(newest, variant_id, "running")] += count
    for gateway in (lineage.get("gateways") or {}).values() if running is None else ():
        counts[
            (gateway.get("rollout_id") or "", gateway.get("variant_id") or "", gateway["state"])
        ] += 1
    for rollout in lineage.get("rollouts", []):
        roid = rollout["rollout_id"]
        state = rollout.get("state", "?")
        picture.nodes.append(
            Node(
                f"ro:{roid}",
                4,
                f"rollout {_short(roid, 12)}",
                state,
                tone=_tone(state),
                href=f"/rollouts/{roid}",
            )
        )
        picture.edges.append((f"rel:{rollout.get('release_id')}", f"ro:{roid}"))
    classes = {v["variant_id"]: v["device_class"] for v in lineage.get("variants", [])}
    for (roid, vid, state), count in sorted(counts.items()):
        key = f"g:{roid}:{vid}:{state}"
        picture.nodes.append(
            Node(
                key,
                5,
                f"{count} gateway{'s' * (count != 1)} {state}",
                classes.get(vid, _short(vid or "nothing", 14)),
                tone="failed" if state == "failed" else "passed",
                href=f"/fleet?variant={vid}" if vid else None,
            )
        )
        picture.edges.append((f"ro:{roid}", key) if roid else (f"r:{vid}", key))
    rows: Counter[int] = Counter()
    for node in picture.nodes:
        node.row = rows[node.column]
        rows[node.column] += 1
    return picture


def _tone(state: str) -> str:
    if state in ("completed",):
        return "passed"
    if state in ("rolled_back", "failed", "cancelled"):
        return "failed"
    return "running"
