"""Every stream, KV bucket and consumer shape of the platform, declared in one place.

Declaration is idempotent: each service declares the whole topology at start-up, so whichever
starts first creates it and the others find it as it should be; a changed config is updated in
place (never by delete + create, which would lose messages or consumer positions).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

DAY_S = 86_400.0
MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class StreamSpec:
    """A stream and its bounds. Every stream has a size cap: the event log refuses new events
    at its cap (``discard_new``: losing history would break lineage rebuilds; `slmops status`
    warns well before), the others drop their oldest messages."""

    name: str
    subjects: tuple[str, ...]
    description: str
    max_bytes: int
    max_age_s: float = 0.0  # 0 = bounded by size only
    max_msgs_per_subject: int = -1  # e.g. per gateway and report kind on the fleet stream
    discard_new: bool = False
    duplicate_window_s: float = 600.0  # how long a Nats-Msg-Id is remembered for de-duplication
    replicas: int = 1


@dataclass(frozen=True)
class KvSpec:
    bucket: str
    description: str
    history: int = 1
    ttl_s: float = 0.0  # 0 = entries never expire
    max_bytes: int = 64 * MIB
    replicas: int = 1

    @property
    def stream(self) -> str:
        """The stream JetStream keeps the bucket in."""
        return f"KV_{self.bucket}"


@dataclass(frozen=True)
class ConsumerSpec:
    """A service's durable pull consumer on one stream, filtered to the subjects it handles."""

    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    ack_wait_s: float
    max_deliver: int
    max_ack_pending: int = 1000
    description: str = ""


PIPELINE = StreamSpec(
    "SLMOPS_PIPELINE",
    (
        "slmops.model.>",
        "slmops.optimization.>",
        "slmops.validation.>",
        "slmops.release.>",
        "slmops.channel.>",
        "slmops.fleet.>",
    ),
    "Model lifecycle: published, optimized, validated, released, channels moved; the field's "
    "findings and measured figures.",
    max_bytes=1 * GIB,
    discard_new=True,
)
ROLLOUT = StreamSpec(
    "SLMOPS_ROLLOUT",
    ("slmops.rollout.>", "slmops.gateway.assignment.>"),
    "Rollout progress and per-gateway assignments (desired state).",
    max_bytes=1 * GIB,
    max_age_s=90 * DAY_S,
)
FLEET = StreamSpec(
    "SLMOPS_FLEET",
    ("slmops.gateway.report.>", "slmops.gateway.reports.>"),
    "Gateway reports: registration, applied/failed, health aggregates; sites' batches.",
    max_bytes=1 * GIB,
    max_age_s=7 * DAY_S,
    # A gateway's subject per report kind keeps its newest 100: one chatty gateway cannot
    # fill the stream, and 10,000 gateways every 30 s stay within the byte cap.
    max_msgs_per_subject=100,
)
DEAD_LETTER = StreamSpec(
    "SLMOPS_DLQ",
    ("slmops.deadletter.>",),
    "Messages a consumer could not handle, with the reason and the original bytes.",
    max_bytes=256 * MIB,
    max_age_s=30 * DAY_S,
)
STREAMS: tuple[StreamSpec, ...] = (PIPELINE, ROLLOUT, FLEET, DEAD_LETTER)

MODEL_VERSIONS_KV = KvSpec(
    "slmops-model-versions", "Published model versions: name/version -> manifest (registry)."
)
VARIANTS_KV = KvSpec("slmops-variants", "Registered variants: variant id -> manifest (registry).")
LINEAGE_KV = KvSpec("slmops-lineage", "Lineage index: a projection of the event log (registry).")
FIELD_TELEMETRY_KV = KvSpec(
    "slmops-field-telemetry",
    "The fleet view: recent windows per variant, class and label set, and the findings "
    "published (telemetry). Aggregates only, so a few MB even for a large fleet.",
    max_bytes=64 * MIB,
)
KV_BUCKETS: tuple[KvSpec, ...] = (
    KvSpec(
        "slmops-rollouts",
        "Rollout state machines, so a restarted service resumes: a header and shards of "
        "gateway progress per rollout, rewritten as reports come (one revision kept: a wave "
        "of 100,000 rewrites ~12 MB of shards many times over).",
        max_bytes=512 * MIB,
    ),
    KvSpec(
        "slmops-desired-state",
        "Desired model per gateway: the source of truth.",
        3,
        max_bytes=512 * MIB,
    ),
    KvSpec(
        "slmops-cohorts",
        "Desired state per cohort (a stable hash range of gateway ids): one signed statement "
        "per cohort and generation, whatever the cohort's size.",
        3,
        max_bytes=64 * MIB,
    ),
    KvSpec(
        "slmops-gateways",
        "Registered gateways: class, labels, capabilities, last seen.",
        max_bytes=512 * MIB,
    ),
    KvSpec("slmops-jobs", "Optimization and validation job states and progress.", 3),
    MODEL_VERSIONS_KV,
    VARIANTS_KV,
    LINEAGE_KV,
    FIELD_TELEMETRY_KV,
)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, a trailing ``>`` one or more."""
    pat, sub = pattern.split("."), subject.split(".")
    for i, part in enumerate(pat):
        if part == ">":
            return len(sub) > i
        if i >= len(sub) or (part != "*" and part != sub[i]):
            return False
    return len(pat) == len(sub)


def stream_for_subject(subject: str, streams: tuple[StreamSpec, ...] = STREAMS) -> StreamSpec:
    """The stream that stores ``subject`` (a filter like ``x.y.>`` counts as its prefix)."""
    probe = subject.replace(">", "x").replace("*", "x")
    for stream in streams:
        if any(subject_matches(p, probe) for p in stream.subjects):
            return stream
    raise LookupError(f"no stream stores subject {subject!r}")


@dataclass
class Topology:
    """What one process declares: all streams and buckets plus its own consumers."""

    streams: tuple[StreamSpec, ...] = STREAMS
    kv_buckets: tuple[KvSpec, ...] = KV_BUCKETS
    consumers: list[ConsumerSpec] = field(default_factory=list)

    def narrowed(self, buckets: tuple[str, ...]) -> Topology:
        """Only the streams this process's consumers read and the ``buckets`` it uses: what a
        least-privileged process (a gateway) declares, being allowed to see nothing else."""
        used = {c.stream for c in self.consumers}
        return Topology(
            tuple(s for s in self.streams if s.name in used),
            tuple(b for b in self.kv_buckets if b.bucket in buckets),
            list(self.consumers),
        )

    def sized(self, replicas: int, stream_max_gb: dict[str, float]) -> Topology:
        """The same topology with ``replicas`` for every stream and bucket, and the byte caps
        of the streams named in ``stream_max_gb`` (GiB; a bucket by its stream ``KV_<name>``)
        replaced. JetStream reserves each cap on disk, so the defaults are modest: a fleet of
        100,000 gateways wants its fleet, rollout and desired-state caps raised."""
        names = {s.name for s in self.streams} | {b.stream for b in self.kv_buckets}
        unknown = set(stream_max_gb) - names
        if unknown:
            raise ValueError(f"no stream {', '.join(sorted(unknown))} to size")

        def cap(name: str, default: int) -> int:
            return int(stream_max_gb[name] * GIB) if name in stream_max_gb else default

        streams = tuple(replace(s, replicas=replicas, max_bytes=cap(s.name, s.max_bytes))
                        for s in self.streams)  # fmt: skip
        buckets = tuple(replace(b, replicas=replicas, max_bytes=cap(b.stream, b.max_bytes))
                        for b in self.kv_buckets)  # fmt: skip
        return Topology(streams, buckets, list(self.consumers))
