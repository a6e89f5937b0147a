"""The local stack: `slmops up/down/status` run NATS, a local S3 server and every service.

Everything binds 127.0.0.1. :mod:`~slmops.stack.components` says what runs (settings with env
prefix ``SLMOPS_STACK_``, the component list, readiness probes), :mod:`~slmops.stack.launcher`
starts it (after :mod:`~slmops.stack.preflight` checks), :mod:`~slmops.stack.supervisor`
restarts what exits (:mod:`~slmops.stack.detached` runs it in the background for `up --detach`),
:mod:`~slmops.stack.state` records it in ``<var_dir>/stack.json``
and stops recorded processes safely, :mod:`~slmops.stack.status` serves `down` and `status`.
"""

from __future__ import annotations

from slmops.stack.components import (
    ComponentKind,
    ComponentSpec,
    PortClaim,
    Probe,
    StackError,
    StackSettings,
    discover_services,
    plan_stack,
    probe,
)
from slmops.stack.launcher import ComponentFailedError, RunningStack, start_stack
from slmops.stack.preflight import AlreadyRunningError, PortInUseError, check_ports
from slmops.stack.signals import Signals
from slmops.stack.state import ComponentRecord, StackState, read_state, state_path
from slmops.stack.status import (
    ComponentStatus,
    SupervisorStatus,
    stack_status,
    status_json,
    stop_stack,
    supervisor_status,
)
from slmops.stack.supervisor import Supervisor, exit_reason, run_up, supervise

__all__ = [
    "AlreadyRunningError",
    "ComponentFailedError",
    "ComponentKind",
    "ComponentRecord",
    "ComponentSpec",
    "ComponentStatus",
    "PortClaim",
    "PortInUseError",
    "Probe",
    "RunningStack",
    "Signals",
    "StackError",
    "StackSettings",
    "StackState",
    "Supervisor",
    "SupervisorStatus",
    "check_ports",
    "discover_services",
    "exit_reason",
    "plan_stack",
    "probe",
    "read_state",
    "run_up",
    "stack_status",
    "start_stack",
    "state_path",
    "status_json",
    "stop_stack",
    "supervise",
    "supervisor_status",
]
