"""Content-defined chunking: cut points, manifests, fetch plans and verified reassembly."""

from __future__ import annotations

import hashlib
import json
import random
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import pytest
from pydantic import ValidationError

from slmops.chunking import (
    Chunk,
    ChunkerParams,
    ChunkIntegrityError,
    ChunkManifest,
    ChunkManifestError,
    FetchPlan,
    assemble,
    chunk_file,
    index_local_chunks,
    plan_fetch,
)
from slmops.chunking.gear import GEAR, masks
from slmops.objectstore import check_digest

KIB = 1024
MIB = 1024 * KIB
M64 = (1 << 64) - 1


class Sizes(TypedDict):
    min_size_bytes: int
    avg_size_bytes: int
    max_size_bytes: int


SMALL: Sizes = {"min_size_bytes": 16 * KIB, "avg_size_bytes": 64 * KIB, "max_size_bytes": 256 * KIB}
TINY: Sizes = {"min_size_bytes": 1 * KIB, "avg_size_bytes": 4 * KIB, "max_size_bytes": 16 * KIB}
MICRO: Sizes = {"min_size_bytes": 16, "avg_size_bytes": 64, "max_size_bytes": 256}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sizes(m: ChunkManifest) -> list[int]:
    return [c.size_bytes for c in m.chunks]


def reference_sizes(
    data: bytes, min_size: int, avg_size: int, max_size: int, boundaries: Sequence[int] = ()
) -> list[int]:
    """The fastcdc-gear-v1 rule, byte by byte, as the spec states it (slow, obviously right)."""
    mask_s, mask_l = masks(avg_size)
    cuts = sorted({b for b in boundaries if 0 < b < len(data)})
    out, start = [], 0
    while start < len(data):
        limit = min([start + max_size, len(data), *(c for c in cuts if c > start)])
        end, h = limit, 0
        for i in range(start + min_size, limit):
            h = ((h << 1) + GEAR[data[i]]) & M64
            if not h & (mask_s if i < start + avg_size else mask_l):
                end = i + 1
                break
        out.append(end - start)
        start = end
    return out


def read_chunks(path: Path, m: ChunkManifest) -> dict[str, bytes]:
    data = path.read_bytes()
    return {c.digest: data[c.offset_bytes : c.offset_bytes + c.size_bytes] for c in m.chunks}


# --- the cut-point rule -------------------------------------------------------------------------


def test_gear_table_and_cut_points_are_pinned(tmp_path: Path) -> None:
    # The table is derived, not random: same on every machine, and changing it breaks manifests.
    expected = [
        int.from_bytes(hashlib.sha256(b"slmops-gear-v1:%d" % i).digest()[:8], "big")
        for i in range(256)
    ]
    data = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(6250))  # stable input
    m = chunk_file(write(tmp_path / "f", data), **TINY)

    assert list(GEAR) == expected
    assert (GEAR[0], GEAR[255]) == (PINNED_GEAR_0, PINNED_GEAR_255)
    assert masks(MIB) == PINNED_MASKS_1MIB
    assert sizes(m)[:8] == PINNED_SIZES


# Recorded from the first implementation; a change here means old manifests no longer match.
PINNED_GEAR_0 = 0x4FE775EBF2EBB9FD
PINNED_GEAR_255 = 0x32F1BC361FC23C9A
PINNED_MASKS_1MIB = (0x2082104108209FFF, 0x401004010041FFF)
PINNED_SIZES = [2604, 7085, 4928, 2380, 4858, 4024, 2492, 9164]


def test_fast_cut_finder_equals_the_byte_by_byte_rule(tmp_path: Path) -> None:
    rng = random.Random(5)
    data = b"".join(
        [
            rng.randbytes(400_000),
            bytes(300_000),  # a zero run: the one-value shortcut, and max-size cuts
            b"ab" * 60_000,  # periodic, not a run
            rng.randbytes(200_000),
            b"\x07" * 50_000,
            rng.randbytes(70_000),
        ]
    )
    path = write(tmp_path / "mixed", data)
    bounds = sorted(rng.sample(range(len(data)), 12))
    # MICRO's masks have few bits, so candidates are dense: that takes the exact fallback.
    for params, b in [(SMALL, ()), (SMALL, bounds), (TINY, ()), (TINY, bounds), (MICRO, bounds)]:
        got = sizes(chunk_file(path, boundaries=b, **params))
        want = reference_sizes(
            data, params["min_size_bytes"], params["avg_size_bytes"], params["max_size_bytes"], b
        )
        assert got == want, params


def test_same_file_gives_same_manifest(tmp_path: Path) -> None:
    data = random.Random(2).randbytes(6 * MIB)
    a, b = write(tmp_path / "a", data), write(tmp_path / "b", data)

    first, second, other_path = chunk_file(a), chunk_file(a), chunk_file(b)

    assert len(first.chunks) >= 3
    assert first == second == other_path
    assert first.digest() == second.digest() == other_path.digest()
    assert first.blob_digest == "sha256:" + hashlib.sha256(data).hexdigest()


def test_chunk_sizes_stay_within_bounds_except_the_last(tmp_path: Path) -> None:
    # Random bytes cut by content; the zero run never matches and is cut at max_size.
    data = random.Random(3).randbytes(3 * MIB) + bytes(MIB + 1000)
    m = chunk_file(write(tmp_path / "f", data), **SMALL)

    body, last = sizes(m)[:-1], sizes(m)[-1]
    assert len(body) > 30
    assert all(SMALL["min_size_bytes"] <= s <= SMALL["max_size_bytes"] for s in body)
    assert 0 < last <= SMALL["max_size_bytes"]
    assert body.count(SMALL["max_size_bytes"]) >= 4  # the zero run
    assert sum(sizes(m)) == len(data) == m.size_bytes
    avg = sum(body) / len(body)
    print(f"\nmean chunk size {avg / KIB:.0f} KiB for avg_size_bytes=64 KiB")


def test_forced_boundaries_always_start_a_chunk(tmp_path: Path) -> None:
    rng = random.Random(4)
    data = rng.randbytes(1500 * KIB)
    bounds = [*rng.sample(range(1, len(data)), 20), 300_000, 300_010, 300_010, 0, len(data)]
    rng.shuffle(bounds)

    m = chunk_file(write(tmp_path / "f", data), boundaries=bounds, **SMALL)

    starts = {c.offset_bytes for c in m.chunks}
    assert set(bounds) - {len(data)} <= starts
    assert 300_010 - 300_000 in sizes(m)  # cut even though closer than min_size
    assert max(sizes(m)) <= SMALL["max_size_bytes"]


@pytest.mark.parametrize("bad", [-1, 1500 * KIB + 1])
def test_boundary_outside_the_file_is_refused(tmp_path: Path, bad: int) -> None:
    path = write(tmp_path / "f", bytes(1500 * KIB))
    with pytest.raises(ValueError, match=f"boundary {bad} is not a byte offset"):
        chunk_file(path, boundaries=[bad])


@pytest.mark.parametrize(
    "sizes_",
    [(64 * KIB, 64 * KIB, 256 * KIB), (16 * KIB, 512 * KIB, 256 * KIB), (0, 64, 128)],
)
def test_chunk_sizes_must_be_ordered(tmp_path: Path, sizes_: tuple[int, int, int]) -> None:
    lo, avg, hi = sizes_
    with pytest.raises(ValueError, match="invalid chunk sizes"):
        chunk_file(
            write(tmp_path / "f", b"x"), min_size_bytes=lo, avg_size_bytes=avg, max_size_bytes=hi
        )


def test_empty_file_has_no_chunks(tmp_path: Path) -> None:
    m = chunk_file(write(tmp_path / "f", b""))
    assert (m.size_bytes, m.chunks) == (0, [])
    assert m.blob_digest == "sha256:" + hashlib.sha256(b"").hexdigest()


# --- delta downloads ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    old: Path
    new: Path
    old_m: ChunkManifest
    new_m: ChunkManifest
    changed_bytes: int


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """~40 MB "model" of 40 tensors of ~1 MB; the new variant changes 4 of them (same size)."""
    rng = random.Random(7)
    tensors = [rng.randbytes(rng.randrange(768_000, 1_280_000)) for _ in range(40)]
    changed = [3, 14, 25, 36]
    new_tensors = [rng.randbytes(len(t)) if i in changed else t for i, t in enumerate(tensors)]
    bounds = [0]
    for t in tensors[:-1]:
        bounds.append(bounds[-1] + len(t))
    d = tmp_path_factory.mktemp("model")
    old, new = (
        write(d / "old.onnx.data", b"".join(tensors)),
        write(d / "new", b"".join(new_tensors)),
    )
    t0 = time.perf_counter()
    old_m = chunk_file(old, boundaries=bounds)
    new_m = chunk_file(new, boundaries=bounds)
    dt = time.perf_counter() - t0
    total = old.stat().st_size + new.stat().st_size
    print(f"\nchunked 2 x {total / 2e6:.0f} MB in {dt:.2f} s: {total / 1e6 / dt:.0f} MB/s")
    return Model(old, new, old_m, new_m, sum(len(tensors[i]) for i in changed))


def test_changed_tensors_cost_about_their_own_size(model: Model) -> None:
    plan = plan_fetch(model.new_m, have=index_local_chunks(model.old, model.old_m))

    print(
        f"\ndelta: fetch {plan.fetch_bytes / 1e6:.1f} MB of {plan.total_bytes / 1e6:.1f} MB "
        f"({plan.fetch_fraction:.1%}) in {len(plan.missing)} of {len(model.new_m.chunks)} chunks; "
        f"changed tensors {model.changed_bytes / 1e6:.1f} MB"
    )
    assert plan.total_bytes == model.new_m.size_bytes
    assert model.changed_bytes <= plan.fetch_bytes <= 0.15 * plan.total_bytes


def test_delta_then_assemble_gives_the_new_file(model: Model, tmp_path: Path) -> None:
    old, new, old_m, new_m = model.old, model.new, model.old_m, model.new_m
    local = index_local_chunks(old, old_m)
    plan = plan_fetch(new_m, have=local)
    store = {d: c for d, c in read_chunks(new, new_m).items() if d in plan.missing}
    served: list[str] = []

    def read_chunk(digest: str) -> bytes:
        served.append(digest)
        if digest in store:
            return store[digest]
        offset, size = local[digest]
        with old.open("rb") as f:
            f.seek(offset)
            return f.read(size)

    assemble(new_m, read_chunk, tmp_path / "model.bin")

    assert (tmp_path / "model.bin").read_bytes() == new.read_bytes()
    assert len(served) == len(new_m.chunks)
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_inserting_at_the_front_keeps_most_chunks(tmp_path: Path) -> None:
    rng = random.Random(11)
    data = rng.randbytes(4 * MIB)
    orig = chunk_file(write(tmp_path / "a", data), **SMALL)
    shifted = chunk_file(write(tmp_path / "b", rng.randbytes(1000) + data), **SMALL)

    plan = plan_fetch(shifted, have=[c.digest for c in orig.chunks])

    print(f"\nafter a 1000-byte insert at the front: fetch {plan.fetch_fraction:.1%}")
    assert len(orig.chunks) > 30
    assert plan.fetch_fraction <= 0.10


def test_plan_fetch_fetches_repeated_content_once(tmp_path: Path) -> None:
    block = random.Random(12).randbytes(64 * KIB)
    params: Sizes = {
        "min_size_bytes": 4 * KIB,
        "avg_size_bytes": 16 * KIB,
        "max_size_bytes": 32 * KIB,
    }
    m = chunk_file(write(tmp_path / "f", block * 3), boundaries=[64 * KIB, 128 * KIB], **params)
    first = m.chunks[0].digest

    plan = plan_fetch(m, have=[])
    partial = plan_fetch(m, have={first})

    assert len(m.chunks) == 3 * len(plan.missing)
    assert plan == FetchPlan(
        missing=[c.digest for c in m.chunks if c.offset_bytes < 64 * KIB],
        fetch_bytes=64 * KIB,
        total_bytes=3 * 64 * KIB,
    )
    assert partial.missing == plan.missing[1:]
    assert partial.fetch_bytes == 64 * KIB - m.chunks[0].size_bytes


def test_index_local_chunks_leaves_out_damaged_chunks(tmp_path: Path) -> None:
    path = write(tmp_path / "f", random.Random(13).randbytes(1 * MIB))
    m = chunk_file(path, **SMALL)
    victim = m.chunks[2]
    with path.open("r+b") as f:
        f.seek(victim.offset_bytes + 5)
        f.write(b"\xff\x00\xff")

    index = index_local_chunks(path, m)

    assert victim.digest not in index
    assert index == {c.digest: (c.offset_bytes, c.size_bytes) for c in m.chunks if c is not victim}


# --- assemble -----------------------------------------------------------------------------------


def test_assemble_round_trip(tmp_path: Path) -> None:
    src = write(tmp_path / "src", random.Random(14).randbytes(2 * MIB + 123))
    m = chunk_file(src, **SMALL)
    chunks = read_chunks(src, m)
    (tmp_path / "out").mkdir()

    assemble(m, chunks.__getitem__, tmp_path / "out" / "dest")

    assert (tmp_path / "out" / "dest").read_bytes() == src.read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["dest"]


def test_corrupt_chunk_fails_and_leaves_no_file(tmp_path: Path) -> None:
    src = write(tmp_path / "src", random.Random(15).randbytes(1 * MIB))
    m = chunk_file(src, **SMALL)
    chunks = read_chunks(src, m)
    bad = m.chunks[1]
    chunks[bad.digest] = b"\x00" + chunks[bad.digest][1:]
    (tmp_path / "out").mkdir()
    dest = tmp_path / "out" / "dest"

    with pytest.raises(ChunkIntegrityError, match="chunk 1 ") as err:
        assemble(m, chunks.__getitem__, dest)

    assert bad.digest in str(err.value)
    assert err.value.expected == bad.digest
    assert not dest.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_short_chunk_or_wrong_blob_digest_fails(tmp_path: Path) -> None:
    src = write(tmp_path / "src", random.Random(16).randbytes(300 * KIB))
    m = chunk_file(src, **SMALL)
    chunks = read_chunks(src, m)
    dest = write(tmp_path / "dest", b"previous version")
    short = dict(chunks)
    short[m.chunks[-1].digest] = chunks[m.chunks[-1].digest][:-1]
    lying = m.model_copy(update={"blob_digest": "sha256:" + "0" * 64})

    with pytest.raises(ChunkIntegrityError, match="size"):
        assemble(m, short.__getitem__, dest)
    with pytest.raises(ChunkIntegrityError, match="blob dest"):
        assemble(lying, chunks.__getitem__, dest)
    nothing: dict[str, bytes] = {}
    with pytest.raises(KeyError):
        assemble(m, nothing.__getitem__, dest)

    assert dest.read_bytes() == b"previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "src"]


# --- the manifest -------------------------------------------------------------------------------


def manifest_dict(**changes: object) -> dict[str, object]:
    d = "sha256:" + "ab" * 32
    m: dict[str, object] = {
        "schema_version": 1,
        "blob_digest": d,
        "size_bytes": 300,
        "chunks": [
            {"offset_bytes": 0, "size_bytes": 100, "digest": d},
            {"offset_bytes": 100, "size_bytes": 200, "digest": d},
        ],
        "chunker": {
            "algorithm": "fastcdc-gear-v1",
            "min_size_bytes": 100,
            "avg_size_bytes": 200,
            "max_size_bytes": 400,
        },
    }
    return m | changes


def test_manifest_json_round_trip(tmp_path: Path) -> None:
    m = chunk_file(write(tmp_path / "f", random.Random(17).randbytes(1 * MIB)), **SMALL)

    text = m.to_json()
    back = ChunkManifest.from_json(text)

    assert back == m
    assert back.digest() == m.digest() == check_digest(m.digest())
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert m.digest() == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    other = ChunkManifest.model_validate(manifest_dict())
    assert other.digest() != m.digest()
    assert ChunkManifest.from_json(json.dumps(manifest_dict()).encode()) == other


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {
                "chunks": [
                    {"offset_bytes": 0, "size_bytes": 100, "digest": "sha256:" + "ab" * 32},
                    {"offset_bytes": 150, "size_bytes": 150, "digest": "sha256:" + "ab" * 32},
                ]
            },
            "gap before chunk 1, which starts at 150 instead of 100",
        ),
        ({"size_bytes": 301}, "chunks sum to 300 bytes but size_bytes=301"),
        ({"blob_digest": "sha256:xyz"}, "invalid digest"),
        ({"schema_version": 2}, "schema_version"),
        ({"extra": 1}, "extra"),
        (
            {
                "chunker": {
                    "algorithm": "fastcdc-gear-v1",
                    "min_size_bytes": 300,
                    "avg_size_bytes": 200,
                    "max_size_bytes": 400,
                }
            },
            "min < avg < max",
        ),
        (
            {
                "chunker": {
                    "algorithm": "fastcdc-gear-v1",
                    "min_size_bytes": 10,
                    "avg_size_bytes": 100,
                    "max_size_bytes": 150,
                }
            },
            "chunk 1 has 200 bytes, more than max_size_bytes=150",
        ),
    ],
)
def test_invalid_manifest_is_refused(changes: dict[str, object], message: str) -> None:
    text = json.dumps(manifest_dict(**changes))

    with pytest.raises(ChunkManifestError, match="invalid chunk manifest") as err:
        ChunkManifest.from_json(text)
    with pytest.raises(ValidationError):
        ChunkManifest.model_validate(json.loads(text))

    assert message in str(err.value)


def test_malformed_json_is_refused() -> None:
    with pytest.raises(ChunkManifestError, match=r"(?s)invalid chunk manifest.*Invalid JSON"):
        ChunkManifest.from_json(b'{"schema_version": 1,')


def test_manifest_models_are_frozen() -> None:
    m = ChunkManifest.model_validate(manifest_dict())
    with pytest.raises(ValidationError):
        m.size_bytes = 1  # type: ignore[misc]
    assert isinstance(m.chunks[0], Chunk)
    assert isinstance(m.chunker, ChunkerParams)


# --- memory -------------------------------------------------------------------------------------


def test_chunking_a_large_file_keeps_memory_bounded(tmp_path: Path) -> None:
    # Mostly a hole (zero runs take a shortcut), with 8 MiB of random bytes that don't.
    path = tmp_path / "sparse"
    with path.open("wb") as f:
        f.truncate(200 * MIB)
        f.seek(100 * MIB)
        f.write(random.Random(18).randbytes(8 * MIB))

    tracemalloc.start()
    try:
        m = chunk_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    print(f"\ntracemalloc peak chunking 200 MiB: {peak / MIB:.1f} MiB")
    assert peak < 20 * MIB
    assert m.size_bytes == sum(sizes(m)) == 200 * MIB
    assert sizes(m)[:25] == [4 * MIB] * 25  # the leading hole, cut at max_size
    assert len({c.digest for c in m.chunks[:25]}) == 1
    assert len(m.chunks) > 50  # the random part was cut by content
