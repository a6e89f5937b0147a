"""Who may do what on the bus: the NATS subject permissions of each kind of principal.

nats-server enforces these per connection (users authenticated by their nkey, see
:mod:`slmops.auth.bususers`). The JetStream API is plain subjects, so least privilege is a list
of subjects: a gateway publishes only its own reports, reads only its own desired-state key
(direct get by subject) and pulls only from its own consumer, whose filter is its own
assignment subject (the filter is part of the create subject, which the server checks against
the request). A service publishes only its own events and writes only its own buckets; creating,
changing, purging or deleting streams is the admin's (``slmops up`` declares the topology as
admin; services find it declared).

Every principal gets replies only on its own inbox prefix, ``_INBOX.<its public key>``: a shared
``_INBOX.>`` would let one gateway read the replies meant for another (its desired state).
"""

from __future__ import annotations

from dataclasses import dataclass

from slmops.bus.handlers import durable_name
from slmops.bus.topology import DEAD_LETTER, KV_BUCKETS, ROLLOUT, STREAMS
from slmops.cohorts import cohort_key, cohort_of

API = "$JS.API"
DESIRED_STATE_BUCKET = "slmops-desired-state"
COHORT_BUCKET = "slmops-cohorts"
#: The rollout service's record per gateway (``slmops_rollout.fleet.GatewayRecord``, JSON):
#: others read only its ``device_class`` and ``labels``.
FLEET_RECORDS_BUCKET = "slmops-gateways"
COHORT_SUBJECT = "slmops.cohort.v1"  # core NATS notifications, one subject per cohort
ASSIGNMENT_SUBJECT = "slmops.gateway.assignment.v1"
REPORT_SUBJECT = "slmops.gateway.report.v1"
REPORTS_SUBJECT = "slmops.gateway.reports.v1"  # batches: never a gateway's to publish
#: Core NATS requests from a site's gateways to its relay (``slmops_gateway.relay``): one
#: subject per gateway, so the relay knows who sent each report.
SITE_RELAY_SUBJECT = "slmops.site.v1"
DEAD_LETTER_SUBJECT = "slmops.deadletter.v1"

#: The event subjects each service publishes (its own events only).
SERVICE_EVENTS: dict[str, tuple[str, ...]] = {
    "registry": ("slmops.model.>", "slmops.channel.>"),
    "optimizer": ("slmops.optimization.>",),
    "validator": ("slmops.validation.>", "slmops.release.>"),
    "rollout": ("slmops.rollout.>", f"{ASSIGNMENT_SUBJECT}.>", f"{COHORT_SUBJECT}.>"),
    "telemetry": ("slmops.fleet.>",),
}
#: The KV buckets each service writes (all of them read every bucket).
SERVICE_BUCKETS: dict[str, tuple[str, ...]] = {
    "registry": ("slmops-model-versions", "slmops-variants", "slmops-lineage"),
    "optimizer": ("slmops-jobs",),
    "validator": ("slmops-jobs",),
    "rollout": ("slmops-rollouts", DESIRED_STATE_BUCKET, COHORT_BUCKET, FLEET_RECORDS_BUCKET),
    "telemetry": ("slmops-field-telemetry",),
}
#: Streams a service may create and delete: the bucket the registry rebuilds its lineage
#: projection in, aside from the live one (which nobody but the admin may delete).
SERVICE_DELETABLE: dict[str, tuple[str, ...]] = {"registry": ("KV_slmops-lineage-next",)}


@dataclass(frozen=True)
class Permissions:
    """Subjects one principal may publish to and subscribe to (``None``: everything);
    ``allow_responses``: it may answer the requests it receives (nats-server lets it publish
    once to each request's reply subject, whoever's inbox that is)."""

    publish: tuple[str, ...] | None
    subscribe: tuple[str, ...] | None
    allow_responses: bool = False


def relay_subject(site: str, gateway_id: str) -> str:
    """Where gateway ``gateway_id`` asks its site's relay to carry a wave report."""
    return f"{SITE_RELAY_SUBJECT}.{site}.report.{gateway_id}"


def inbox_prefix(public_key: str) -> str:
    """The reply-subject prefix of the principal with ``public_key``."""
    return f"_INBOX.{public_key}"


def admin_permissions() -> Permissions:
    return Permissions(publish=None, subscribe=None)


def _reading() -> list[str]:
    """What every service needs to read: stream and consumer info, messages, KV entries."""
    subjects = [
        f"{API}.INFO", f"{API}.STREAM.INFO.>", f"{API}.STREAM.NAMES", f"{API}.STREAM.LIST",
        f"{API}.STREAM.MSG.GET.>", f"{API}.DIRECT.GET.>", f"{API}.CONSUMER.INFO.>",
        f"{API}.CONSUMER.NAMES.>", f"{API}.CONSUMER.LIST.>", "$JS.FC.>",
    ]  # fmt: skip
    for bucket in KV_BUCKETS:
        subjects += _listing(bucket.stream)
    return subjects


def _listing(kv_stream: str) -> list[str]:
    """Listings and watches of a bucket are short-lived consumers on its stream (no service
    has a durable there, so creating and deleting consumers on it harms nobody)."""
    return [
        f"{API}.CONSUMER.CREATE.{kv_stream}", f"{API}.CONSUMER.CREATE.{kv_stream}.>",
        f"{API}.CONSUMER.MSG.NEXT.{kv_stream}.*", f"{API}.CONSUMER.DELETE.{kv_stream}.*",
    ]  # fmt: skip


def _replaying() -> list[str]:
    """The registry rebuilds its lineage projection by replaying the event streams through
    ordered consumers (named at random, no filter). The one service trusted with creating
    consumers on the event streams: it could name another service's durable."""
    streams = [s.name for s in STREAMS if s is not DEAD_LETTER]
    return [f"{API}.CONSUMER.CREATE.{name}{form}" for name in streams for form in ("", ".*")]


MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


def _own_advisories(consumer: str, streams: tuple[str, ...]) -> list[str]:
    """The advisories of its own consumers the dead-letter handling listens to."""
    return [f"{MAX_DELIVERIES_ADVISORY}.{s}.{durable_name(consumer, s)}" for s in streams]


def _own_durables(service: str) -> list[str]:
    """Create, pull from and ack on the service's own durable consumers, nothing else's."""
    subjects = []
    for stream in STREAMS:
        durable = durable_name(service, stream.name)
        subjects += [
            f"{API}.CONSUMER.CREATE.{stream.name}.{durable}",
            f"{API}.CONSUMER.CREATE.{stream.name}.{durable}.>",
            f"{API}.CONSUMER.DURABLE.CREATE.{stream.name}.{durable}",
            f"{API}.CONSUMER.MSG.NEXT.{stream.name}.{durable}",
            f"$JS.ACK.{stream.name}.{durable}.>",
            f"{DEAD_LETTER_SUBJECT}.{durable}",
        ]
    return subjects


def service_permissions(service: str, public_key: str) -> Permissions:
    """A platform service: its own events, buckets and consumers; reading everything."""
    if service not in SERVICE_EVENTS:
        raise ValueError(f"no bus permissions for service {service!r}")
    publish = [
        *SERVICE_EVENTS[service],
        *(f"$KV.{bucket}.>" for bucket in SERVICE_BUCKETS[service]),
        *(f"{API}.STREAM.DELETE.{name}" for name in SERVICE_DELETABLE.get(service, ())),
        *_reading(),
        *_own_durables(service),
    ]
    publish += [f"{API}.STREAM.CREATE.{name}" for name in SERVICE_DELETABLE.get(service, ())]
    if service == "registry":
        publish += [*_replaying(), "$KV.slmops-lineage-next.>",
                    *_listing("KV_slmops-lineage-next")]  # fmt: skip
    subscribe = [f"{inbox_prefix(public_key)}.>",
                 *_own_advisories(service, tuple(s.name for s in STREAMS))]  # fmt: skip
    return Permissions(tuple(publish), tuple(subscribe))


#: What the console watches to keep its pages live (plain subscriptions: it stores nothing):
#: rollout events and the reports that move a wave. Health reports (the bulk of a fleet's
#: traffic) are left out: an open page is re-rendered every few seconds anyway.
CONSOLE_SUBJECTS = (
    "slmops.rollout.>",
    *(f"{REPORT_SUBJECT}.{kind}.>" for kind in ("acknowledged", "applied", "failed")),
    f"{REPORTS_SUBJECT}.>",
)


def console_permissions(public_key: str) -> Permissions:
    """The console: it only listens to rollout events and gateway reports (what it shows
    comes from the APIs, called with the signed-in operator's token). Its one publish subject
    reads account info: an empty allow list would mean no restriction to nats-server."""
    subscribe = (f"{inbox_prefix(public_key)}.>", *CONSOLE_SUBJECTS)
    return Permissions(publish=(f"{API}.INFO",), subscribe=subscribe)


def gateway_permissions(gateway_id: str, public_key: str, site: str = "") -> Permissions:
    """One gateway: its own reports, its own desired state and assignments (heard on its own
    subject; a gateway without the cohort protocol pulls them from its own durable consumer,
    which one with it deletes), and its own cohort's state and notifications (the cohort is a
    hash of its id: fixed at enrollment); enrolled at a ``site``, its own subject to that
    site's relay as well."""
    desired = f"KV_{DESIRED_STATE_BUCKET}"
    stream = ROLLOUT.name
    durable = durable_name(f"gateway-{gateway_id}", stream)
    cohort = cohort_key(cohort_of(gateway_id))
    publish = (
        f"{API}.STREAM.INFO.KV_{COHORT_BUCKET}",
        f"{API}.DIRECT.GET.KV_{COHORT_BUCKET}.$KV.{COHORT_BUCKET}.{cohort}",
        f"{REPORT_SUBJECT}.*.{gateway_id}",
        f"{API}.INFO",
        f"{API}.STREAM.INFO.{desired}",
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.DIRECT.GET.{desired}.$KV.{DESIRED_STATE_BUCKET}.{gateway_id}",
        f"{API}.CONSUMER.CREATE.{stream}.{durable}.{ASSIGNMENT_SUBJECT}.{gateway_id}",
        f"{API}.CONSUMER.INFO.{stream}.{durable}",
        f"{API}.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"{API}.CONSUMER.DELETE.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
        f"{DEAD_LETTER_SUBJECT}.{durable}",
        *([relay_subject(site, gateway_id)] if site else []),
    )
    subscribe = (
        f"{inbox_prefix(public_key)}.>",
        f"{ASSIGNMENT_SUBJECT}.{gateway_id}",
        f"{COHORT_SUBJECT}.{cohort}",
        *_own_advisories(f"gateway-{gateway_id}", (stream,)),
    )
    return Permissions(publish, subscribe)


def site_relay_permissions(site: str, public_key: str) -> Permissions:
    """A site's relay: it hears its own site's gateways (each on its own subject, which only
    that gateway may publish to), answers them, and publishes their wave reports as the
    site's batches - nothing else (the services accept a site's batch only for gateways that
    declared that site themselves: ``slmops.events.reports.may_carry``)."""
    publish = (f"{API}.INFO", f"{REPORTS_SUBJECT}.{site}.*")
    subscribe = (f"{inbox_prefix(public_key)}.>", f"{SITE_RELAY_SUBJECT}.{site}.report.*")
    return Permissions(publish, subscribe, allow_responses=True)


def simulator_permissions(public_key: str) -> Permissions:
    """The fleet simulator runs thousands of agents on one connection: the union of their
    permissions (every gateway's reports, desired state and assignment consumers). A test and
    benchmark identity; a real gateway never gets it."""
    desired = f"KV_{DESIRED_STATE_BUCKET}"
    stream = ROLLOUT.name
    publish = (
        f"{REPORT_SUBJECT}.>",
        f"{REPORTS_SUBJECT}.>",  # its agents' wave reports, folded as a site's would be
        f"{SITE_RELAY_SUBJECT}.>",  # or sent through sites' relays, as real gateways' are
        f"{API}.STREAM.INFO.KV_{COHORT_BUCKET}",
        f"{API}.DIRECT.GET.KV_{COHORT_BUCKET}.>",
        f"{API}.INFO",
        f"{API}.STREAM.INFO.{desired}",
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.DIRECT.GET.{desired}.>",
        f"{API}.STREAM.MSG.GET.{desired}",
        f"{API}.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"{API}.CONSUMER.CREATE.{stream}.*.{ASSIGNMENT_SUBJECT}.>",
        f"{API}.CONSUMER.INFO.{stream}.*",
        f"{API}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{API}.CONSUMER.DELETE.{stream}.*",
        f"$JS.ACK.{stream}.*.>",
        f"{DEAD_LETTER_SUBJECT}.*",
    )
    subscribe = (
        f"{inbox_prefix(public_key)}.>",
        f"{COHORT_SUBJECT}.>",
        f"{ASSIGNMENT_SUBJECT}.>",  # its cohort agents' own assignments, heard as core NATS
        f"{MAX_DELIVERIES_ADVISORY}.{stream}.*",
    )
    return Permissions(publish, subscribe)
