"""`slmops publish`, `slmops models` and `slmops lineage` against a real registry process.

The registry runs as ``python -m slmops_registry`` on a free port, wired to this test's NATS and
the moto S3 server; the CLI runs in-process through typer's CliRunner.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tarfile
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from slmops.cli.main import app
from slmops.cli.packaging import PackagingError, infer_format, pack_directory
from slmops.cli.render import render_lineage
from slmops.testing.ports import free_port

pytestmark = pytest.mark.integration


def gguf(tag: bytes) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 2, 0) + tag.ljust(64, b"\0")


def cli(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def blob_keys(platform_env: dict[str, str]) -> list[str]:
    s3 = boto3.client(
        "s3",
        endpoint_url=platform_env["SLMOPS_S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=platform_env["SLMOPS_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=platform_env["SLMOPS_S3_SECRET_ACCESS_KEY"],
    )
    listing = s3.list_objects_v2(Bucket=platform_env["SLMOPS_S3_BUCKET"], Prefix="blobs/")
    return [item["Key"] for item in listing.get("Contents", [])]


def hf_folder(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"model_type": "bert"}')
    (root / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    return root


def test_publish_gguf_list_it_show_lineage_and_refuse_other_content(
    registry_url: str, tmp_path: Path
) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(gguf(b"first"))
    url = ["--registry-url", registry_url]

    first = cli("publish", model, "--name", "tiny", "--version", "1.0", *url)
    again = cli("publish", model, "--name", "tiny", "--version", "1.0", "--json", *url)
    listed = cli("models", "--json", env={"SLMOPS_REGISTRY_URL": registry_url})
    table = cli("models", *url)

    assert first.exit_code == 0, first.output
    assert re.fullmatch(
        r"tiny@1\.0 manifest sha256:[0-9a-f]{64} \(event \S+\)\n"
        r"its journey is trace ([0-9a-f]{32}): `slmops trace show \1`\n",
        first.stdout,
    )  # a new version's trace id, to follow it through the services
    assert again.exit_code == 0, again.output
    manifest = json.loads(again.stdout)
    assert manifest["digest"] in first.stdout  # a repeat answers the first manifest
    assert manifest["manifest"]["format"] == "gguf"
    assert manifest["manifest"]["task"] == "text-generation"  # the gguf default
    artifact_digest = "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()
    assert manifest["manifest"]["artifact"]["digest"] == artifact_digest
    assert listed.exit_code == 0, listed.output
    [entry] = json.loads(listed.stdout)
    assert entry["model_name"] == "tiny"
    assert [(v["version"], v["artifact_digest"]) for v in entry["versions"]] == [
        ("1.0", artifact_digest)
    ]
    assert table.exit_code == 0, table.output
    assert "tiny" in table.stdout
    assert artifact_digest[:19] in table.stdout

    deadline = time.monotonic() + 10  # the lineage is projected from the model.published event
    while (raw := cli("lineage", "tiny", "1.0", "--json", *url)).exit_code != 0:
        assert time.monotonic() < deadline, raw.output
        time.sleep(0.1)
    shown = cli("lineage", "tiny", "1.0", *url)
    unknown = cli("lineage", "tiny", "9.9", *url)

    assert json.loads(raw.stdout)["published"]["manifest_digest"] == manifest["digest"]
    assert shown.exit_code == 0, shown.output
    assert "tiny 1.0" in shown.stdout
    assert f"manifest {manifest['digest'][:19]}" in shown.stdout
    assert unknown.exit_code == 1
    assert "no model tiny 9.9" in unknown.output

    model.write_bytes(gguf(b"second"))
    conflict = cli("publish", model, "--name", "tiny", "--version", "1.0", *url)

    assert conflict.exit_code == 1
    assert "already published" in conflict.output
    assert "HTTP 409" in conflict.output
    assert "Traceback" not in conflict.output


def test_publish_hf_folder_refusing_symlinks_before_any_upload(
    registry_url: str, platform_env: dict[str, str], tmp_path: Path
) -> None:
    folder = hf_folder(tmp_path / "encoder")
    link = folder / "extra.safetensors"
    link.symlink_to(folder / "model.safetensors")
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text('{"text": "hello", "label": 1}\n{"text": "bye", "label": 0}\n')
    args: list[str | Path] = [
        "publish", folder, "--name", "encoder", "--version", "2024.1",
        "--task", "feature-extraction", "--eval", eval_set, "--classes", "cpu-small, npu",
        "--label", "team=search", "--label", "note=a=b", "--pooling", "cls", "--json",
        "--registry-url", registry_url,
    ]  # fmt: skip

    linked = cli(*args)

    assert linked.exit_code == 1
    assert f"{link} is a symbolic link" in linked.output
    assert blob_keys(platform_env) == []  # refused before anything was sent

    link.unlink()
    result = cli(*args)

    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)["manifest"]
    assert manifest["format"] == "hf-safetensors"  # inferred from config.json + *.safetensors
    assert manifest["device_classes"] == ["cpu-small", "npu"]
    assert manifest["labels"] == {"team": "search", "note": "a=b"}
    assert manifest["details"] == {"pooling": "cls"}  # the encoder's pooling, signed
    expected_eval = "sha256:" + hashlib.sha256(eval_set.read_bytes()).hexdigest()
    assert manifest["eval_set"]["digest"] == expected_eval
    packed = io.BytesIO()
    pack_directory(folder, packed)
    expected_artifact = "sha256:" + hashlib.sha256(packed.getvalue()).hexdigest()
    assert manifest["artifact"]["digest"] == expected_artifact
    assert len(blob_keys(platform_env)) == 2  # the tar and the evaluation set


def test_bad_arguments_fail_before_contacting_the_registry(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # "not reachable" would mean it tried
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 16)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")

    unknown = cli("publish", weights, "--name", "m", "--version", "1", "--registry-url", closed)
    no_task = cli("publish", onnx, "--name", "m", "--version", "1", "--registry-url", closed)
    bad_label = cli(
        "publish", onnx, "--name", "m", "--version", "1", "--task", "feature-extraction",
        "--label", "novalue", "--registry-url", closed,
    )  # fmt: skip
    bad_version = cli("publish", onnx, "--name", "m", "--version", "1 0", "--registry-url", closed)
    bad_task = cli(
        "publish", onnx, "--name", "m", "--version", "1", "--task", "chat", "--registry-url", closed
    )
    bad_pooling = cli(
        "publish", onnx, "--name", "m", "--version", "1", "--task", "feature-extraction",
        "--pooling", "max", "--registry-url", closed,
    )  # fmt: skip

    assert bad_version.exit_code == 1
    assert "invalid --version '1 0': String should match pattern" in bad_version.output
    assert bad_task.exit_code == 1
    assert "invalid --task 'chat'" in bad_task.output
    assert bad_pooling.exit_code == 1
    assert "invalid --pooling 'max'" in bad_pooling.output
    assert unknown.exit_code == 1
    assert "pass --format (onnx | hf-safetensors | gguf)" in unknown.output
    assert no_task.exit_code == 1
    assert "pass --task" in no_task.output
    assert bad_label.exit_code == 1
    assert "is not key=value" in bad_label.output


def test_unreachable_registry_is_one_clear_line(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    model = tmp_path / "tiny.gguf"
    model.write_bytes(gguf(b"x"))
    env = {"SLMOPS_REGISTRY_URL": closed}

    results = [
        cli("publish", model, "--name", "tiny", "--version", "1", env=env),
        cli("models", env=env),
        cli("lineage", "tiny", "1", "--registry-url", closed),
    ]

    for result in results:
        assert result.exit_code == 1
        assert f"registry not reachable at {closed}: start it with `slmops up`" in result.output
        assert "SLMOPS_REGISTRY_URL" in result.output
        assert "Traceback" not in result.output


def test_format_inference(tmp_path: Path) -> None:
    (tmp_path / "a.GGUF").write_bytes(b"GGUF")
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"\x08\x07")
    (onnx_dir / "model.onnx.data").write_bytes(b"\0" * 8)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.onnx").write_bytes(b"")
    (two / "b.onnx").write_bytes(b"")

    assert infer_format(tmp_path / "a.GGUF") == "gguf"
    assert infer_format(onnx_dir / "model.onnx") == "onnx"
    assert infer_format(onnx_dir) == "onnx"
    assert infer_format(hf_folder(tmp_path / "hf")) == "hf-safetensors"
    with pytest.raises(PackagingError, match=r"exactly one \*\.onnx file \(2 found\)"):
        infer_format(two)


def test_folder_tar_is_deterministic(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "model")
    first, second = io.BytesIO(), io.BytesIO()
    pack_directory(folder, first)
    os.utime(folder / "config.json", (1_000_000, 1_000_000))
    (folder / "model.safetensors").chmod(0o600)
    pack_directory(folder, second)

    assert first.getvalue() == second.getvalue()
    first.seek(0)
    with tarfile.open(fileobj=first) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "config.json", "model.safetensors", "tokenizer", "tokenizer/vocab.txt",
    ]  # fmt: skip
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_render_lineage_shows_every_part_and_tolerates_missing_ones() -> None:
    doc: dict[str, Any] = {
        "model_name": "tiny",
        "version": "1",
        "published": {
            "manifest_digest": "sha256:" + "a" * 64,
            "artifact": {"digest": "sha256:" + "b" * 64, "size_bytes": 3 * 1024 * 1024},
            "time": "2025-01-02T03:04:05Z",
        },
        "variants": [
            {
                "variant_id": "v-int8",
                "device_class": "cpu-small",
                "recipe": {"name": "int8", "passes": []},
                "size_bytes": 1024,
                "status": "rejected",
                "reports": [
                    {
                        "verdict": "failed",
                        "reason": "too slow",
                        "gates": [
                            {"name": "latency_p95", "passed": False},
                            {"name": "accuracy", "passed": True},
                            {"name": "canary", "passed": None},
                        ],
                    }
                ],
            },
            {"variant_id": "v-fp16", "device_class": "npu", "status": "validated"},
        ],
        "optimization_failures": [
            {"device_class": "mcu", "recipe_name": "int4", "reason": "op unsupported"}
        ],
        "releases": [
            {"release_id": "r1", "entries": [{"device_class": "npu", "variant_id": "v-fp16"}]}
        ],
        "rollouts": [
            {
                "rollout_id": "ro1",
                "release_id": "r1",
                "state": "completed",
                "waves": [{"percent": 10}],
            }
        ],
        "gateways": {
            "gw1": {"variant_id": "v-fp16", "state": "applied"},
            "gw2": {"variant_id": "v-fp16", "state": "failed"},
        },
    }
    console = Console(record=True, width=200)

    console.print(render_lineage(doc))
    console.print(render_lineage({"model_name": "bare", "version": "0", "variants": None}))
    text = console.export_text()

    assert "published 2025-01-02 03:04:05: manifest sha256:aaaaaaaaaaaa" in text
    assert "(3.0 MiB)" in text
    assert re.search(
        r"v-int8 .*cpu-small .*int8 .*1\.0 KiB .*rejected .*"
        r"failed \(1/2 gates passed; failed latency_p95\): too slow",
        text,
    )
    assert re.search(r"v-fp16 .*npu .*validated .*1 \(1 failed\)", text)
    assert "mcu / int4: op unsupported" in text
    assert "npu -> v-fp16\n" in text
    assert "ro1 of release r1: completed (waves 10%; 0 steps)" in text
    assert "gateways: 2 (1 applied, 1 failed)" in text
    assert "bare 0" in text
