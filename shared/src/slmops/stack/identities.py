"""Enrolment and revocation on the running local stack: tokens for the APIs, users on the bus.

Both take effect on the bus within moments: nats-server re-reads its users on SIGHUP (sent
here), lets a new gateway in and closes the connections of users it no longer has. Tokens are
refused by the services as soon as they see ``revoked.json`` change.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from slmops.auth import local_credentials, revoke
from slmops.auth.bususers import bus_user_name, local_bus_users
from slmops.auth.local import LOCAL_TOKEN_TTL_S
from slmops.stack.components import ComponentKind
from slmops.stack.state import find_process, read_state, state_path
from slmops.trust.local import pinned_root_file


@dataclass(frozen=True)
class Enrolled:
    gateway_id: str
    token_file: Path  # SLMOPS_AUTH_TOKEN_FILE on the device
    nkey_file: Path  # SLMOPS_NATS_NKEY_FILE on the device
    trust_root_file: Path  # SLMOPS_GATEWAY_TRUST_ROOT_FILE: the root it pins


def reload_nats(var_dir: Path) -> bool:
    """Have the local stack's nats-server (every node of a cluster) re-read its users
    (False: no NATS of a stack is running)."""
    state = read_state(state_path(var_dir))
    reloaded = False
    for record in state.components if state else []:
        if record.kind is ComponentKind.NATS and (proc := find_process(record)) is not None:
            proc.send_signal(signal.SIGHUP)
            reloaded = True
    return reloaded


def enroll_gateway(
    var_dir: Path, gateway_id: str, device_class: str | None = None,
    ttl_s: float = LOCAL_TOKEN_TTL_S, site: str = "",
) -> Enrolled:  # fmt: skip
    """A gateway's own identity: its API token (for ``device_class`` only, if given) and its
    NATS user, allowed only its own reports, desired state and assignments (and, enrolled at
    a ``site``, its own subject to that site's relay)."""
    token_file = local_credentials(var_dir).mint_gateway(gateway_id, ttl_s, device_class)
    users = local_bus_users(var_dir)
    users.ensure(f"gateway-{gateway_id}", "gateway", gateway_id, site)
    reload_nats(var_dir)
    return Enrolled(gateway_id, token_file, users.seed_file(f"gateway-{gateway_id}"),
                    pinned_root_file(var_dir))  # fmt: skip


def enroll_site(var_dir: Path, site: str) -> Path:
    """A site relay's NATS user (``slmops_gateway.relay``): it hears its site's gateways and
    publishes their wave reports as the site's batches. Returns its seed file."""
    users = local_bus_users(var_dir)
    users.ensure(f"site-{site}", "site", site)
    reload_nats(var_dir)
    return users.seed_file(f"site-{site}")


def revoke_subject(var_dir: Path, subject: str, keys_file: Path | None = None) -> list[str]:
    """Refuse ``subject`` everywhere: every token issued until now, and its NATS user (its
    connection is closed). Returns what was done, for the operator."""
    keys_file = keys_file or local_credentials(var_dir).keys_file
    done = [f"tokens issued until now are refused ({revoke(keys_file, subject)})"]
    if local_bus_users(var_dir).remove(bus_user_name(subject)):
        reloaded = reload_nats(var_dir)
        done.append("its NATS user is removed" + (" and disconnected" if reloaded else ""))
    return done
