"""What a gateway hears on core NATS: a notification that is not what its subject promises
is ignored with a warning (the desired state in KV stays the truth), never raised into the
NATS client's callback."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from nats.aio.msg import Msg

from slmops.bus.permissions import ASSIGNMENT_SUBJECT, COHORT_SUBJECT
from slmops.cohorts import CohortEntry, CohortState
from slmops.events import GatewayAssignment, new_event
from slmops.events.payloads import ArtifactRef, DesiredModel
from slmops_gateway.notifications import heard_assignment, heard_cohort_state

DESIRED = DesiredModel(
    model_name="minilm", version="1.0.0", variant_id="v-1", manifest_digest="sha256:" + "a" * 64,
    artifact=ArtifactRef(digest="sha256:" + "b" * 64, size_bytes=10, uri="s3://b/x"),
)  # fmt: skip


def _msg(subject: str, data: bytes) -> Msg:
    client: Any = None  # the decoders never reply or ack
    return Msg(client, subject=subject, data=data)


def _assignment_bytes(gateway_id: str) -> bytes:
    assignment = GatewayAssignment(gateway_id=gateway_id, generation=3, desired=DESIRED)
    return new_event(assignment, source="/test").model_dump_json().encode()


def test_an_assignment_on_its_own_subject_is_heard() -> None:
    heard = heard_assignment(_msg(f"{ASSIGNMENT_SUBJECT}.gw-1", _assignment_bytes("gw-1")))

    assert heard is not None
    assert (heard.gateway_id, heard.generation, heard.desired) == ("gw-1", 3, DESIRED)


@pytest.mark.parametrize(
    ("subject", "data", "reason"),
    [
        (f"{ASSIGNMENT_SUBJECT}.gw-1", b'{"not": "a cloudevent"', "malformed assignment"),
        # gw-2's assignment published where gw-1 listens: the subject binds who it is for
        (f"{ASSIGNMENT_SUBJECT}.gw-1", _assignment_bytes("gw-2"), "gw-2"),
    ],
)
def test_an_assignment_that_is_not_its_subjects_is_ignored_with_the_reason(
    subject: str, data: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="slmops_gateway.notifications"):
        heard = heard_assignment(_msg(subject, data))

    assert heard is None
    assert reason in caplog.text
    assert subject in caplog.text


def test_a_cohort_state_is_heard_and_a_malformed_one_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entry = CohortEntry(rollout_id="ro-1", generation=4, device_class="cpu", desired=DESIRED)
    state = CohortState(cohort=7, generation=4, entries=[entry])
    subject = f"{COHORT_SUBJECT}.0007"

    heard = heard_cohort_state(_msg(subject, state.model_dump_json().encode()))
    with caplog.at_level(logging.WARNING, logger="slmops_gateway.notifications"):
        broken = heard_cohort_state(_msg(subject, b'{"cohort": "seven"}'))

    assert heard == state
    assert broken is None
    assert "malformed cohort state" in caplog.text
