"""Who calls: principals, the scopes their tokens carry, and the roles that bundle scopes.

A token names one principal (``sub``) and its scopes. A route accepts a set of scopes and lets a
principal in if it holds any of them. Roles are only how tokens are minted: a person gets
``publisher``, ``operator``, ``viewer`` or ``admin``; each service and each gateway gets its
own role, so what only a service may do (store a variant, store a report, have a rollback
signed) is never in a person's token, not even an admin's.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Scope(StrEnum):
    READ = "read"  # catalogs, manifests, lineage, jobs, rollouts, the fleet
    PUBLISH = "publish"  # upload, publish versions, evaluation sets
    OPERATE = "operate"  # rollouts and their actions, jobs, channels
    ADMIN = "admin"  # garbage collection, lineage rebuild
    METRICS = "metrics"  # /metrics, read-only
    VARIANTS_WRITE = "variants:write"  # the optimizer stores variants
    REPORTS_WRITE = "reports:write"  # the validator stores validation reports
    ROLLBACKS_SIGN = "rollbacks:sign"  # the rollout service has rollbacks signed
    GATEWAY = "gateway"  # what a gateway installs: manifests, reports, download URLs


#: Role name -> the scopes a token minted for it carries.
ROLES: dict[str, frozenset[Scope]] = {
    "viewer": frozenset({Scope.READ}),
    "publisher": frozenset({Scope.READ, Scope.PUBLISH}),
    "operator": frozenset({Scope.READ, Scope.OPERATE}),
    "admin": frozenset({Scope.READ, Scope.PUBLISH, Scope.OPERATE, Scope.ADMIN, Scope.METRICS}),
    "metrics": frozenset({Scope.METRICS}),
    "gateway": frozenset({Scope.GATEWAY}),
    "service:registry": frozenset({Scope.READ}),
    "service:optimizer": frozenset({Scope.READ, Scope.VARIANTS_WRITE}),
    "service:validator": frozenset({Scope.READ, Scope.REPORTS_WRITE}),
    "service:rollout": frozenset({Scope.READ, Scope.ROLLBACKS_SIGN}),
    "service:console": frozenset({Scope.READ}),
    # The telemetry service reads variants and their reports (the budgets a class is held to).
    "service:telemetry": frozenset({Scope.READ}),
}

#: The platform's services, each with its own identity (``service:<name>``).
SERVICES = ("registry", "optimizer", "validator", "rollout", "telemetry")


class UnknownRoleError(ValueError):
    pass


def scopes_of_role(role: str) -> frozenset[Scope]:
    try:
        return ROLES[role]
    except KeyError:
        raise UnknownRoleError(
            f"unknown role {role!r}; roles: {', '.join(sorted(ROLES))}"
        ) from None


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``subject`` like ``user:admin``, ``service:optimizer`` or
    ``gateway:gw-0001``; what it may do is its ``scopes``."""

    subject: str
    scopes: frozenset[Scope]
    token_id: str = ""
    expires_at: int = 0  # unix seconds
    device_class: str | None = None  # a gateway's class: it reads only what was made for it

    def may_read_class(self, classes: list[str] | tuple[str, ...]) -> bool:
        """Whether this principal may read a manifest made for ``classes`` (empty: all).
        Readers may read anything; a gateway enrolled for a class only that class's."""
        if Scope.READ in self.scopes or self.device_class is None or not classes:
            return True
        return self.device_class in classes

    def holds_any(self, accepted: frozenset[Scope]) -> bool:
        return not self.scopes.isdisjoint(accepted)

    @property
    def gateway_id(self) -> str | None:
        """The gateway's id when the principal is one gateway."""
        kind, _, name = self.subject.partition(":")
        return name if kind == "gateway" and name else None
