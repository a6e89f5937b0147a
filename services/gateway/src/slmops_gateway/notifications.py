"""What a gateway hears on core NATS: its own assignment subject and its cohort's subject.

A notification only says "act now"; the desired state in KV stays the truth a reconnecting
gateway reads. So a malformed one is ignored with a warning (nothing is lost: reconciling
finds the state), never raised into the NATS client's callback. The real gateway
(``app.py``) and the simulated sites (``simassignments.py``, ``simulator.py``) decode them the
same way here.
"""

from __future__ import annotations

import logging

from nats.aio.msg import Msg
from pydantic import ValidationError

from slmops.cohorts import CohortState
from slmops.events import EventDecodeError, GatewayAssignment, decode_message

log = logging.getLogger(__name__)


def heard_assignment(msg: Msg) -> GatewayAssignment | None:
    """The assignment a message carries (checked against the subject it came on), or None."""
    try:
        event = decode_message(msg.subject, msg.data)
    except EventDecodeError as exc:
        log.warning("ignored a malformed assignment on %s: %s", msg.subject, exc)
        return None
    if not isinstance(event.data, GatewayAssignment):
        log.warning("ignored a %s on the assignment subject %s", event.type, msg.subject)
        return None
    return event.data


def heard_cohort_state(msg: Msg) -> CohortState | None:
    """The cohort state a notification carries, or None."""
    try:
        return CohortState.model_validate_json(msg.data)
    except ValidationError as exc:
        log.warning("ignored a malformed cohort state on %s: %s", msg.subject, exc)
        return None
