"""Who gets what of a release: the model per device class, the gateways a rollout targets,
and the classes it gives nothing, each with the reason an operator reads in its status.

Pure (no I/O): the engine plans a new rollout with it, and the ticker plans a ``waiting`` one
again once gateways have registered. A rollout that would reach no gateway at all is refused
(``NoTargets``) rather than recorded as done: "completed" must mean gateways run the release.
"""

from __future__ import annotations

from collections.abc import Iterable

from slmops.events import ReleaseCreated
from slmops.events.payloads import DesiredModel
from slmops_rollout.fleet import GatewayRecord, overlay_for
from slmops_rollout.plans import matches, plan_waves
from slmops_rollout.state import GatewayProgress, RolloutState


class NotRollable(Exception):
    """A rollout refused before it began; ``reasons`` say why per device class."""

    def __init__(self, message: str, reasons: dict[str, str]) -> None:
        super().__init__(message)
        self.reasons = reasons


class NoVariant(NotRollable):
    """No class of the version has a variant: its release failed (``release.failed``), or an
    older validator created one with nothing in it."""

    def __init__(self, model_name: str, version: str, reasons: dict[str, str]) -> None:
        super().__init__(
            f"{model_name} {version} has no release to roll out: no device class has a "
            "variant to ship",
            reasons,
        )


class NoTargets(NotRollable):
    """No registered gateway of any class with a variant matches the selector."""

    def __init__(self, state: RolloutState) -> None:
        super().__init__(
            f"{state.model_name} {state.version} not rolled out: no registered gateway of "
            f"{', '.join(sorted(state.desired))} matches selector {selector_text(state.selector)}",
            dict(state.skipped),
        )


def selector_text(selector: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "{} (any labels)"


def desired_models(release: ReleaseCreated) -> dict[str, DesiredModel]:
    """Per device class with a variant, what its gateways install; ``NoVariant`` if none."""
    desired = {
        e.device_class: DesiredModel(
            model_name=release.model_name,
            version=release.version,
            variant_id=e.variant_id,
            manifest_digest=e.manifest_digest,
            artifact=e.artifact,
        )
        for e in release.entries
        if e.variant_id and e.manifest_digest and e.artifact
    }
    if not desired:
        raise NoVariant(release.model_name, release.version, without_variant(release))
    return desired


def without_variant(release: ReleaseCreated) -> dict[str, str]:
    """The classes of a release that have no variant, with the validator's reason."""
    return {
        e.device_class: f"no variant: {e.reason or 'none named'}"
        for e in release.entries
        if not (e.variant_id and e.manifest_digest and e.artifact)
    }


def plan(state: RolloutState, records: Iterable[GatewayRecord]) -> bool:
    """Plan ``state``'s waves over the registered gateways of its classes that match its
    selector; name in ``state.skipped`` each class that gets nothing. True if any gateway is
    targeted."""
    fleet = {
        r.gateway_id: r
        for r in records
        if r.device_class in state.desired and matches(r.labels, state.selector)
        and runs_wanted_model(r, state)
    }  # fmt: skip
    state.waves = plan_waves(state.rollout_id, fleet, state.policy)
    state.gateways = {
        g: _progress(i, fleet[g], overlay_for(fleet[g].labels, state.overlays))
        for i, wave in enumerate(state.waves)
        for g in wave
    }
    covered = {r.device_class for r in fleet.values()}
    unmatched = {c: _no_gateway(c, state) for c in state.desired if c not in covered}
    kept = {c: why for c, why in state.skipped.items() if c not in state.desired}
    state.skipped = dict(sorted({**kept, **unmatched}.items()))
    return bool(state.waves)


def waiting_reason(state: RolloutState) -> str:
    missing = "; ".join(why for c, why in state.skipped.items() if c in state.desired)
    return f"waiting for gateways ({missing}): it starts once one registers"


def runs_wanted_model(record_: GatewayRecord, state: RolloutState) -> bool:
    """Whether a gateway runs what a rollout limited to one model replaces (always true for
    a rollout that is not)."""
    if state.only_model is None:
        return True
    return (record_.running_model_name == state.only_model
            or record_.running_variant_id in state.only_variants)  # fmt: skip


def _no_gateway(device_class: str, state: RolloutState) -> str:
    running = f" running {state.only_model}" if state.only_model else ""
    if not state.selector:
        return f"no gateway of class {device_class}{running} is registered"
    labels = selector_text(state.selector)
    return f"no registered gateway of class {device_class}{running} matches selector {labels}"


def _progress(wave: int, record_: GatewayRecord, overlay: dict[str, int]) -> GatewayProgress:
    health = record_.health
    same = record_.health_variant_id == record_.running_variant_id
    return GatewayProgress(
        wave=wave, device_class=record_.device_class, overlay=overlay,
        previous_variant_id=record_.running_variant_id,
        baseline_p95_ms=health.latency_p95_ms if health and same else None,
    )  # fmt: skip
