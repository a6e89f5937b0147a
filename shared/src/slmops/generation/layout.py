"""The runtime's layout of a variant: its graph, and its weights in a file beside it.

A variant travels as one self-describing ONNX file (one digest signed, chunked, verified). Given
that single file, onnxruntime-genai keeps the whole model's bytes in memory next to the tensors
ONNX Runtime makes from them: gemma-3-270m's 306 MB variant held 990 MB of RSS. With the weights
in an external data file ONNX Runtime maps them from disk instead: 625 MB. So before a runtime
loads a variant, its weights are moved out once, locally, into the runtime's own folder - a
derived layout of the verified file, never a second artifact.

The split runs in a child process (``python -m slmops.generation.layout SRC DEST``): parsing the
protobuf costs about twice the file in memory for a moment, which must not stay in (or be
measured as the peak of) the process that serves or probes the model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

GRAPH = "model.onnx"
WEIGHTS = "model.onnx.data"
_STAMP = "layout.json"


def ensure_layout(model_path: Path, folder: Path) -> Path:
    """``folder``/model.onnx (+ its weights file) for the variant at ``model_path``, made once
    per source file (its path, size and modification time); returns the graph's path."""
    source = Path(model_path).resolve()
    stat = source.stat()
    stamp = {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = folder / _STAMP
    graph = folder / GRAPH
    if graph.is_file() and marker.is_file() and json.loads(marker.read_text()) == stamp:
        return graph
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "slmops.generation.layout", str(source), str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"{source.name} cannot be laid out for the runtime: {tail[:300]}")
    marker.write_text(json.dumps(stamp))
    return graph


def split(source: Path, folder: Path) -> None:
    """Write ``source``'s graph and its weights (tensors of 1 KB and more) into ``folder``."""
    import onnx

    proto = onnx.load(str(source), load_external_data=True)
    for stale in (folder / GRAPH, folder / WEIGHTS):
        stale.unlink(missing_ok=True)  # never write through a link to the verified file
    onnx.save_model(
        proto,
        str(folder / GRAPH),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=WEIGHTS,
        size_threshold=1024,
    )


if __name__ == "__main__":
    split(Path(sys.argv[1]), Path(sys.argv[2]))
