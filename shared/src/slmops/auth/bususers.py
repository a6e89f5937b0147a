"""Who may connect to NATS: one nkey user per process, with its subject permissions.

Why nkeys in the server's configuration (and not NATS's operator/account JWTs): the platform is
one account, so the JWT hierarchy (operator, account, signing keys, a resolver to push account
updates to) would only add keys to guard. Each principal's seed stays with it (a file, mode
0600); nats-server knows public keys and permissions (``auth.conf``, included by its config).
Enrolling a gateway adds a user, revoking one removes it; a configuration reload (SIGHUP) then
closes a removed user's connection at once and refuses it afterwards. At millions of gateways
the configuration grows with the fleet; JWT users signed by an account key are the way then.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nkeys

from slmops.auth.principals import SERVICES
from slmops.bus.permissions import (
    Permissions,
    admin_permissions,
    console_permissions,
    gateway_permissions,
    service_permissions,
    simulator_permissions,
    site_relay_permissions,
)
from slmops.secretfiles import write_private


@dataclass(frozen=True)
class BusUser:
    name: str  # the seed file's stem: admin, service-<name>, gateway-<id>, site-<site>, ...
    kind: str  # admin | service | gateway | site | simulator | console
    ident: str  # the service's name, the gateway's id, the site's name ("" otherwise)
    public_key: str
    site: str = ""  # a gateway's site (its relay's), if it was enrolled at one

    def permissions(self) -> Permissions:
        if self.kind == "service":
            return service_permissions(self.ident, self.public_key)
        if self.kind == "gateway":
            return gateway_permissions(self.ident, self.public_key, self.site)
        if self.kind == "site":
            return site_relay_permissions(self.ident, self.public_key)
        if self.kind == "simulator":
            return simulator_permissions(self.public_key)
        if self.kind == "console":
            return console_permissions(self.public_key)
        return admin_permissions()


def bus_user_name(subject: str) -> str:
    """The bus user of a token subject: ``gateway:gw-1`` -> ``gateway-gw-1``,
    ``service:rollout`` -> ``service-rollout``, ``site:paris`` -> ``site-paris``,
    ``user:admin`` -> ``admin``."""
    kind, _, ident = subject.partition(":")
    if kind in ("gateway", "service", "site"):
        return f"{kind}-{ident}"
    if kind == "simulator":
        return "simulator"
    return ident


@dataclass(frozen=True)
class BusUsers:
    """The users of the local stack's NATS server, under ``<var_dir>/auth/nats``."""

    root: Path

    @property
    def users_file(self) -> Path:
        return self.root / "users.json"

    @property
    def config_file(self) -> Path:
        """The local server's configuration (``nats-server -c``; a reload re-reads it)."""
        return self.root / "auth.conf"

    @property
    def users_conf_file(self) -> Path:
        """The ``users = [...]`` list alone: what a deployment includes in its own account
        (deploy/k8s/nats.yaml) or authorization block."""
        return self.root / "users.conf"

    def seed_file(self, name: str) -> Path:
        return self.root / f"{name}.nk"

    def users(self) -> dict[str, BusUser]:
        if not self.users_file.exists():
            return {}
        data = json.loads(self.users_file.read_text())
        return {name: BusUser(name=name, **fields) for name, fields in data.items()}

    def ensure(self, name: str, kind: str, ident: str = "", site: str = "") -> BusUser:
        """The user ``name`` (its seed created once), recorded and in the configuration."""
        seed_file = self.seed_file(name)
        if not seed_file.exists():
            seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
            write_private(seed_file, seed)
        public_key = nkeys.from_seed(seed_file.read_text().strip().encode()).public_key.decode()
        user = BusUser(name, kind, ident, public_key, site)
        users = self.users()
        if users.get(name) != user:
            users[name] = user
            self._save(users)
        return user

    def remove(self, name: str) -> bool:
        """Forget user ``name`` and its seed (True if it existed); the server refuses it once
        it re-reads the configuration."""
        users = self.users()
        found = users.pop(name, None) is not None
        self.seed_file(name).unlink(missing_ok=True)
        if found:
            self._save(users)
        return found

    def _save(self, users: dict[str, BusUser]) -> None:
        data = {u.name: {"kind": u.kind, "ident": u.ident, "public_key": u.public_key,
                         **({"site": u.site} if u.site else {})}
                for u in users.values()}  # fmt: skip
        write_private(self.users_file, json.dumps(data, indent=1, sort_keys=True))
        self.write_config()

    def write_config(self) -> None:
        """The server's users from the recorded ones and this release's permissions."""
        write_private(self.users_conf_file, render_users(self.users().values()))
        write_private(self.config_file, f"{_HEADER}\nauthorization {{\n  include users.conf\n}}")


_HEADER = "# written by slmops (slmops.auth.bususers); edits are overwritten"


def render_users(users: Iterable[BusUser]) -> str:
    """nats-server's ``users`` list: each user's public key and permissions."""
    entries = []
    for user in users:
        perms = user.permissions()
        fields = [f"nkey: {json.dumps(user.public_key)}"]
        parts = []
        if perms.publish is not None:
            parts.append(f"publish: {{allow: {json.dumps(list(perms.publish))}}}")
        if perms.subscribe is not None:
            parts.append(f"subscribe: {{allow: {json.dumps(list(perms.subscribe))}}}")
        if perms.allow_responses:
            parts.append("allow_responses: true")
        if parts:
            fields.append(f"permissions: {{{', '.join(parts)}}}")
        entries.append(f"  {{{', '.join(fields)}}}  # {user.name}")
    return "\n".join([_HEADER, "users = [", *entries, "]"])


def local_bus_users(var_dir: Path) -> BusUsers:
    return BusUsers(var_dir / "auth" / "nats")


def ensure_local_bus_users(var_dir: Path, gateway_ids: tuple[str, ...] = ()) -> BusUsers:
    """The admin, each service, the simulator and ``gateway_ids``: created once, kept."""
    users = local_bus_users(var_dir)
    users.ensure("admin", "admin")
    users.ensure("simulator", "simulator")
    for service in SERVICES:
        users.ensure(f"service-{service}", "service", service)
    users.ensure("service-console", "console", "console")
    for gateway_id in gateway_ids:
        users.ensure(f"gateway-{gateway_id}", "gateway", gateway_id)
    users.write_config()  # permissions are this release's, whoever wrote the users
    return users
