"""What to try next for a device class the field found too slow: the candidates, ranked by the
evidence (pure: the registry look-ups that feed it live in ``reoptimize_handlers``).

The candidates are the class's own recipes for the model's format and task, except the one
the regressed variant was made with, plus recipes derived from them where the pass registry
and the class allow: a weight-only recipe one precision lower (8 -> 4 bits), and for encoders
dynamic INT8 when the class has no such recipe. They are ranked by what is known of each:
its own figure measured by the class's devices (a variant that ran in the field before), else
its host figure against the regressed variant's on one host (validation reports):
``field value x host ratio`` predicts its field figure. Those predicted to meet the
budget come first, best first; then the unmeasured ones, lowest precision and smallest first.
A candidate measured no better than the regressed variant, or predicted to miss the budget
anyway, is dropped: the validator would reject it with the same arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from slmops.events import variant_id_for
from slmops.events.payloads import FieldEvidence, PassSpec, Recipe
from slmops.profiles import DeviceProfile, Precision
from slmops_optimizer.passes import PassError, create_pass

#: Lower is smaller and (on memory-bound devices) faster: the order unmeasured candidates go in.
PRECISION_RANK: dict[str, int] = {"int4": 0, "int8": 1, "fp16": 2, "fp32": 3}
ENCODER_TASKS = ("feature-extraction", "text-classification")
#: Operators a derived recipe's pass puts in the graph: a class that cannot run them gets none.
_PASS_OPERATORS: dict[str, tuple[str, ...]] = {
    "weight_only": ("MatMulNBits",),
    "gguf_blocks": ("MatMulNBits",),
    "int8_dynamic": ("DynamicQuantizeLinear", "MatMulInteger"),
}
DERIVED_INT8_DYNAMIC = "field-int8-dynamic"


@dataclass(frozen=True)
class Candidate:
    recipe: Recipe
    variant_id: str
    precision: Precision
    derived_from: str | None = None  # the recipe it lowers; None: one of the class's own


@dataclass(frozen=True)
class Known:
    """What was measured of a candidate against the regressed variant."""

    ratio: float | None = None  # candidate's host figure / regressed variant's, one host
    basis: str = ""  # where the figure comes from, for the log and the plan's reason
    size_mb: float | None = None
    field_value: float | None = None  # the figure the class's devices measured of it


@dataclass(frozen=True)
class Ranked:
    candidate: Candidate
    predicted: float | None  # its field figure, measured or predicted; None: not known


@dataclass
class Ranking:
    chosen: list[Ranked] = field(default_factory=list)
    dropped: list[tuple[Candidate, str]] = field(default_factory=list)

    def nothing_left(self, evidence: FieldEvidence, none_applies: str) -> str:
        """The plan's reason when no candidate is left (the operator reads it)."""
        why = "; ".join(f"{c.recipe.name}: {reason}" for c, reason in self.dropped)
        return (
            f"no recipe left that could meet {evidence.metric} {bound_word(evidence)} "
            f"{evidence.budget:g} in the field (measured {evidence.field_value:g} on "
            f"{evidence.variant_id}): {why or none_applies}"
        )


def bound_word(evidence: FieldEvidence) -> str:
    return "<=" if evidence.bound == "max" else ">="


def precision_of(recipe: Recipe) -> Precision:
    """The lowest weight precision a recipe's passes leave (fp32 when none quantizes)."""
    found: Precision = "fp32"
    for spec in recipe.passes:
        precision = _pass_precision(spec)
        if precision is not None and PRECISION_RANK[precision] < PRECISION_RANK[found]:
            found = precision
    return found


def _pass_precision(spec: PassSpec) -> Precision | None:
    if spec.name == "weight_only":
        return "int8" if spec.config.get("bits", 4) == 8 else "int4"
    if spec.name == "gguf_blocks":
        return "int4"
    if spec.name in ("int8_dynamic", "int8_static_qdq"):
        return "int8"
    if spec.name == "fp16":
        return "fp16"
    return None


def candidates_for(
    profile: DeviceProfile,
    fmt: str,
    task: str,
    parent_digest: str,
    regressed_variant: str,
    regressed_recipe: Recipe | None,
) -> list[Candidate]:
    """Every recipe worth trying for the class, in the profile's order, derived ones after."""
    own = [c.recipe() for c in profile.candidates(fmt, task)]
    found: list[Candidate] = []
    seen_passes: list[list[PassSpec]] = []

    def add(recipe: Recipe, derived_from: str | None) -> None:
        variant_id = variant_id_for(parent_digest, recipe, profile.name)
        if variant_id == regressed_variant or recipe.passes in seen_passes:
            return
        if regressed_recipe is not None and recipe.passes == regressed_recipe.passes:
            return  # the regressed variant's recipe under another name
        seen_passes.append(recipe.passes)
        found.append(Candidate(recipe, variant_id, precision_of(recipe), derived_from))

    for recipe in own:
        add(recipe, None)
    bases = own + ([regressed_recipe] if regressed_recipe and regressed_recipe not in own else [])
    has_int4_weights = any(_uses(r, "weight_only") and precision_of(r) == "int4" for r in bases)
    for base in bases if not has_int4_weights else []:
        for derived in _derived(base, profile):
            add(derived, base.name)
    if task in ENCODER_TASKS and not any(_uses(r, "int8_dynamic") for r in bases):
        int8 = _int8_dynamic(bases[0] if bases else None, profile)
        if int8 is not None:
            add(int8, bases[0].name if bases else None)
    return found


def _derived(base: Recipe, profile: DeviceProfile) -> list[Recipe]:
    """A weight-only recipe at 8 bits, at 4 bits (same blocks): half the bytes to stream (only
    planned when the class has no 4-bit weight-only recipe of its own)."""
    lowered = [
        PassSpec(name=s.name, config={**s.config, "bits": 4})
        if s.name == "weight_only" and s.config.get("bits") == 8
        else s
        for s in base.passes
    ]
    if lowered == base.passes:
        return []
    recipe = Recipe(name=f"{base.name}-to-int4", passes=lowered)
    return [recipe] if _runs_on(recipe, profile, "int4") else []


def _int8_dynamic(base: Recipe | None, profile: DeviceProfile) -> Recipe | None:
    """Dynamic INT8 with per-channel weights, after the base recipe's conversion."""
    if profile.requires_static_qdq:
        return None
    convert = next((s for s in base.passes if s.name == "convert"), None) if base else None
    recipe = Recipe(
        name=DERIVED_INT8_DYNAMIC,
        passes=[convert or PassSpec(name="convert"),
                PassSpec(name="int8_dynamic", config={"per_channel": True})],
    )  # fmt: skip
    return recipe if _runs_on(recipe, profile, "int8") else None


def _runs_on(recipe: Recipe, profile: DeviceProfile, precision: Precision) -> bool:
    """The class runs the precision and every operator the passes add; each pass accepts its
    configuration (the registry checks it without running anything)."""
    if precision not in profile.precisions:
        return False
    for spec in recipe.passes:
        if set(_PASS_OPERATORS.get(spec.name, ())) & set(profile.unsupported_operators):
            return False
        try:
            create_pass(spec.name, dict(spec.config))
        except PassError:
            return False
    return True


def _uses(recipe: Recipe, pass_name: str) -> bool:
    return any(s.name == pass_name for s in recipe.passes)


def rank(
    evidence: FieldEvidence, candidates: list[Candidate], known: dict[str, Known], cap: int
) -> Ranking:
    """The candidates to run (at most ``cap``), best first, and the dropped ones with why."""
    ranking = Ranking()
    meeting: list[tuple[float, int, float, int, Ranked]] = []
    unmeasured: list[tuple[int, float, int, Ranked]] = []
    better = 1.0 if evidence.bound == "max" else -1.0  # smaller predicted is better for max
    for order, candidate in enumerate(candidates):
        facts = known.get(candidate.variant_id, Known())
        size = facts.size_mb if facts.size_mb is not None else math.inf
        precision = PRECISION_RANK[candidate.precision]
        if facts.field_value is not None:  # measured on the devices: no prediction needed
            predicted = facts.field_value
            ratio = predicted / evidence.field_value if evidence.field_value else math.inf
        elif facts.ratio is not None:
            ratio = facts.ratio
            predicted = evidence.field_value * ratio
        else:
            unmeasured.append((precision, size, order, Ranked(candidate, None)))
            continue
        why = f"x{ratio:.2f}" + (f", {facts.basis}" if facts.basis else "")
        verb = "measured" if facts.field_value is not None else "predicted"
        if better * (ratio - 1.0) >= 0:
            ranking.dropped.append((candidate, f"no better than {evidence.variant_id} ({why})"))
        elif _breaks(evidence, predicted):
            ranking.dropped.append((candidate, f"{verb} {predicted:.4g} in the field ({why})"))
        else:
            ranked = Ranked(candidate, predicted)
            meeting.append((better * predicted, precision, size, order, ranked))
    ordered = [r for *_, r in sorted(meeting, key=lambda m: m[:4])]
    ordered += [r for *_, r in sorted(unmeasured, key=lambda u: u[:3])]
    ranking.chosen = ordered[:cap]
    ranking.dropped += [(r.candidate, f"beyond the {cap} candidates tried") for r in ordered[cap:]]
    return ranking


def _breaks(evidence: FieldEvidence, value: float) -> bool:
    return value > evidence.budget if evidence.bound == "max" else value < evidence.budget
