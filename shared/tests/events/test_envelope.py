"""The CloudEvents envelope: our events are standard, and standard events are ours."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkCloudEvent

from slmops.events import (
    EVENT_TYPES,
    EventDecodeError,
    GatewayAssignment,
    ModelPublished,
    UnknownEventTypeError,
    decode_event,
    derive_event_id,
)
from slmops.testing.factories import model_published, sample_digest


def test_our_event_parses_with_the_official_cloudevents_sdk() -> None:
    event = model_published()

    parsed = JSONFormat().read(None, event.to_json())

    assert parsed.get_specversion() == "1.0"
    assert parsed.get_id() == event.id
    assert parsed.get_type() == "slmops.model.published.v1"
    assert parsed.get_source() == "/slmops/test"
    assert parsed.get_time() == event.time
    assert parsed.get_data() == json.loads(event.data.model_dump_json(exclude_none=True))


def test_event_written_by_the_official_sdk_decodes_to_a_typed_payload() -> None:
    data = json.loads(model_published().data.model_dump_json())
    sdk_event = SdkCloudEvent(
        attributes={
            "id": "from-sdk-1",
            "source": "urn:upstream:trainer",
            "type": "slmops.model.published.v1",
            "specversion": "1.0",
            "time": datetime(2026, 11, 29, tzinfo=UTC),
            "datacontenttype": "application/json",
            "partition": "p7",  # an extension attribute we do not know: kept, not rejected
        },
        data=data,
    )

    decoded = decode_event(JSONFormat().write(sdk_event))

    assert isinstance(decoded.data, ModelPublished)
    assert decoded.id == "from-sdk-1"
    assert decoded.data.artifact.digest == data["artifact"]["digest"]
    assert decoded.model_extra == {"partition": "p7"}


def test_unknown_payload_fields_are_ignored_by_consumers() -> None:
    raw = json.loads(model_published().to_json())
    raw["data"]["added_in_a_later_minor"] = {"x": 1}

    decoded = decode_event(json.dumps(raw).encode())

    assert decoded.data.model_name == raw["data"]["model_name"]


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda e: e.update(specversion="0.3"), EventDecodeError, "unsupported specversion"),
        (lambda e: e.update(type="slmops.nope.v1"), UnknownEventTypeError, "unknown event type"),
        (lambda e: e.update(type="com.other.thing"), UnknownEventTypeError, "unknown event type"),
        (
            lambda e: (
                e["data"].update(digest="md5:abc") or e["data"]["artifact"].update(digest="md5:abc")
            ),
            EventDecodeError,
            "data.artifact.digest",
        ),
        (lambda e: e["data"].update(model_name="../../etc"), EventDecodeError, "model_name"),
        (lambda e: e.pop("source"), EventDecodeError, "missing source"),
    ],
    ids=[
        "specversion",
        "unknown-type",
        "foreign-type",
        "bad-digest",
        "traversal-name",
        "no-source",
    ],
)
def test_invalid_events_are_rejected_with_the_reason(
    mutate: object, error: type[Exception], message: str
) -> None:
    raw = json.loads(model_published().to_json())
    mutate(raw)  # type: ignore[operator]

    with pytest.raises(error, match=message.replace(".", r"\.")):
        decode_event(json.dumps(raw).encode())


def test_routed_events_carry_their_target_in_the_subject() -> None:
    from slmops.events import ArtifactRef, new_event
    from slmops.events.payloads import DesiredModel

    digest = sample_digest("m")
    assignment = GatewayAssignment(
        gateway_id="gw-0042",
        generation=3,
        desired=DesiredModel(
            model_name="m", version="1", variant_id="v1", manifest_digest=digest,
            artifact=ArtifactRef(digest=digest, size_bytes=1, uri="s3://b/k"),
        ),
    )  # fmt: skip

    event = new_event(assignment, source="/slmops/rollout")

    assert event.nats_subject == "slmops.gateway.assignment.v1.gw-0042"
    assert model_published().nats_subject == "slmops.model.published.v1"


def test_derived_ids_are_deterministic_and_input_sensitive() -> None:
    assert derive_event_id("a", "b") == derive_event_id("a", "b")
    assert derive_event_id("a", "b") != derive_event_id("ab", "")
    assert derive_event_id("a", "b") != derive_event_id("b", "a")


def test_every_core_event_type_of_the_architecture_is_defined() -> None:
    core = {
        "model.published", "optimization.completed", "optimization.failed",
        "validation.passed", "validation.failed", "release.created", "rollout.started",
        "rollout.wave.started", "rollout.paused", "rollout.resumed", "rollout.completed",
        "rollout.rolled_back", "gateway.assignment", "gateway.report",
    }  # fmt: skip

    assert {f"slmops.{name}.v1" for name in core} <= set(EVENT_TYPES)
