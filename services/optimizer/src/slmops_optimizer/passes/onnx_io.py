"""What the ONNX → ONNX passes share: reading and writing models, an output folder that
disappears on failure, a sandbox for ONNX Runtime's quantizers, sample feeds, a one-shot
self-check in ONNX Runtime and error messages that name the operator. (Which nodes to keep in
higher precision, and the refinement ladders, live in ``sensitivity``.)

Heavy imports (onnx, onnxruntime, numpy) stay inside the functions: importing a pass module must
stay cheap for the API and for planning.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from slmops_optimizer.passes.base import OnnxModel, PassContext, PassError

MODEL_FILE = "model.onnx"
#: Protobuf cannot serialize a message of 2 GiB or more; stay clear of it with some headroom.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
_CORRUPT_HINT = "the file is corrupt or incomplete: re-run the previous step (or re-publish it)"
#: ORT input type names → numpy dtypes, for synthetic feeds.
_ORT_TYPES = {f"tensor({t})": t for t in ("int64", "int32", "float16", "bool")} | {
    "tensor(float)": "float32"
}

# chdir is process-wide: quantizer runs in threads of one process take turns.
_SANDBOX_LOCK = threading.RLock()


def require_input(pass_name: str, model: OnnxModel | None) -> OnnxModel:
    """The pass's input with an absolute path (quantizers run in a sandbox cwd)."""
    if model is None:
        raise PassError(f"{pass_name}: needs an ONNX model as input; put 'convert' before it")
    return OnnxModel(model.path.resolve())


@contextmanager
def producing(ctx: PassContext, step: str) -> Iterator[Path]:
    """``ctx.output_dir(step)``, removed again if the step fails (no half-written model is ever
    mistaken for a result)."""
    folder = ctx.output_dir(step).resolve()  # absolute: quantizers run in another cwd
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def load_model(path: Path, pass_name: str, with_weights: bool = True) -> Any:
    """The ModelProto at ``path`` (external data included unless ``with_weights`` is False)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=with_weights)
    except Exception as exc:  # DecodeError, missing external data, ...
        raise PassError(
            f"{pass_name}: cannot read ONNX model {path.name}: {_short(exc)}; {_CORRUPT_HINT}"
        ) from exc


def save_model(model: Any, folder: Path) -> OnnxModel:
    """Write ``model`` as ``folder/model.onnx``, weights in ``model.onnx.data`` when it is large."""
    import onnx

    path = folder / MODEL_FILE
    if model.ByteSize() >= EXTERNAL_DATA_THRESHOLD_BYTES:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=MODEL_FILE + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return OnnxModel(path)


def is_large(model: OnnxModel) -> bool:
    """Whether a quantizer must write its output with external data."""
    return model.size_bytes >= EXTERNAL_DATA_THRESHOLD_BYTES


def graph_input_names(model: Any) -> list[str]:
    """Graph inputs that are fed at run time (older exports also list initializers as inputs)."""
    weights = {init.name for init in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in weights]


def opset_of(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


@contextmanager
def quantizer_sandbox(ctx: PassContext, step: str) -> Iterator[Path]:
    """A temp folder under the job's work dir, made the current directory while ONNX Runtime's
    quantizers run (they drop ``sym_shape_infer_temp.onnx`` and ``*-inferred.onnx`` files in
    the cwd or beside their input); removed afterwards, whatever happens."""
    with _SANDBOX_LOCK:
        parent = ctx.work_dir.resolve() / ".tmp"
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{step}-", dir=parent))
        previous = Path.cwd()
        os.chdir(folder)
        try:
            yield folder
        finally:
            os.chdir(previous)
            shutil.rmtree(folder, ignore_errors=True)
            with suppress(OSError):
                folder.parent.rmdir()  # only when no other sandbox remains


def stage_input(model: OnnxModel, folder: Path) -> Path:
    """Place the model and its external data into ``folder``, so files a quantizer writes
    "beside its input" land in the sandbox, not in the previous step's output."""
    copy_model_files(model.path.parent, folder)
    return folder / model.path.name


def copy_model_files(source: Path, target: Path) -> None:
    """Every file of a model folder into ``target``: the graph hard-linked when the disk allows,
    external data copied (onnx refuses to load external data files with several hard links)."""
    for item in source.iterdir():
        if not item.is_file():
            continue
        if item.suffix == ".onnx":
            try:
                os.link(item, target / item.name)
                continue
            except OSError:  # another file system
                pass
        shutil.copy2(item, target / item.name)


def sample_feeds(ctx: PassContext, inputs: Sequence[Any]) -> list[dict[str, Any]]:
    """Feeds for a session whose inputs are ``inputs`` (ORT NodeArgs): the job's samples
    restricted to them, or one synthetic batch (token ids 1, full masks, zeros) if it has none."""
    import numpy as np

    names = [arg.name for arg in inputs]
    if ctx.samples is not None:
        feeds = [f for f in ctx.samples.for_inputs(names) if set(f) == set(names)]
        if feeds:
            return feeds
    feed: dict[str, Any] = {}
    for arg in inputs:
        # Symbolic dims: batch 1, past length 0, any other length 8.
        shape = [
            dim if isinstance(dim, int) else 1 if i == 0 else 0 if "past" in str(dim) else 8
            for i, dim in enumerate(arg.shape)
        ]
        dtype = np.dtype(_ORT_TYPES.get(arg.type, "float32"))
        feed[arg.name] = (np.ones if dtype.kind in "iu" else np.zeros)(shape, dtype)
    return [feed]


def unknown_nodes(model: Any, names: list[str]) -> list[str]:
    """The names in ``names`` that no node of ``model`` has (a typo, or another export)."""
    present = {node.name for node in model.graph.node}
    return [name for name in names if name not in present]


def note_result(
    ctx: PassContext,
    pass_name: str,
    source: OnnxModel,
    result: OnnxModel,
    what: str,
    kept: Sequence[str] = (),
    unknown: Sequence[str] = (),
) -> None:
    """One log line per step: what was done, the size change, and exclusions."""
    line = (
        f"{pass_name}: {what}: {source.size_bytes / 1e6:.1f} MB -> {result.size_bytes / 1e6:.1f} MB"
    )
    if kept:
        line += f"; {len(kept)} node(s) kept in higher precision"
    if unknown:
        line += f"; no node named {', '.join(unknown[:5])} (ignored)"
    ctx.note(line)


def open_session(pass_name: str, path: Path, ctx: PassContext) -> Any:
    """An ONNX Runtime CPU session on ``path``; a model ORT rejects raises PassError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.intra_op_threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PassError(
            f"{pass_name}: ONNX Runtime rejects the model: {explain_ort_error(exc)}"
        ) from exc


def self_check(pass_name: str, model: OnnxModel, ctx: PassContext) -> list[Any]:
    """Load the output in ONNX Runtime and run it once; the outputs of the first sample batch."""
    session = open_session(pass_name, model.path, ctx)
    feed = sample_feeds(ctx, session.get_inputs())[0]
    try:
        return list(session.run(None, feed))
    except Exception as exc:
        raise PassError(
            f"{pass_name}: the output model fails to run in ONNX Runtime: {explain_ort_error(exc)}"
        ) from exc


def explain_ort_error(
    exc: BaseException,
    hint: str = "keep that node out of this pass (its nodes_to_exclude or node_block_list) or "
    "drop the pass from the recipe",
) -> str:
    """ORT's message led by the operator and node it names, plus what to do about it."""
    text = _short(exc)
    if any(m in text for m in ("INVALID_PROTOBUF", "Protobuf parsing failed", "parse proto")):
        return f"cannot read ONNX model: {text}; {_CORRUPT_HINT}"
    op = re.search(
        r"Op \((\w+)\)|implementation for (\w+)\(|([\w.]+:\w+|\w+)\(-?\d+\) is not a reg", text
    )
    node = re.search(r"Node \(([^)]*)\)|node with name '([^']*)'", text)
    where = ""
    if op:
        where += f"operator {next(g for g in op.groups() if g)}"
    if node:
        where += f"{' at ' if where else ''}node {next((g for g in node.groups() if g), '?')!r}"
    if not where:
        hint = "check the input model with onnx.checker and the previous step's log"
    return f"{where + ': ' if where else ''}{text}; {hint}"


def _short(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
