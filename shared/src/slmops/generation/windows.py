"""A generation graph that scores whole windows: logits at every position, not only the last.

The graphs we serve compute the LM head for the last position only (onnxruntime-genai's
``prune_lm_head``, llama.cpp does the same): generating never needs more, and on a prompt the LM
head over every position dominates time to first token and memory (gemma-3-270m: 64 positions x
262,144 logits, 67 MB, and a dequantized weight for the batched product). Scoring a candidate
against its fp32 reference - top-1 agreement and perplexity over windows, in the optimizer's
search and the validator's parity - needs every position. :func:`full_logits_model` takes the
served file and bypasses the last-position selection in memory: the same weights, the same
nodes, the selection removed, so what is judged is what is served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Names onnxruntime-genai's builder gives the last-position selection before the LM head.
_GATHER_SUFFIX = "/prune/Gather"
_UNSQUEEZE_SUFFIX = "/prune/Unsqueeze"


def full_logits_model(path: Path) -> Any:
    """The model at ``path`` (a ModelProto, weights loaded) with logits at every position."""
    import onnx

    proto = onnx.load(str(path), load_external_data=True)
    unprune(proto)
    return proto


def unprune(proto: Any) -> bool:
    """Bypass the last-position selection of ``proto`` in place; False if it has none."""
    graph = proto.graph
    gather = next((n for n in graph.node if n.name.endswith(_GATHER_SUFFIX)), None)
    unsqueeze = next((n for n in graph.node if n.name.endswith(_UNSQUEEZE_SUFFIX)), None)
    if gather is None or unsqueeze is None or unsqueeze.input[0] != gather.output[0]:
        return False
    hidden, selected = gather.input[0], unsqueeze.output[0]
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == selected:
                node.input[index] = hidden
    kept = [n for n in graph.node if n is not gather and n is not unsqueeze]
    del graph.node[:]
    graph.node.extend(kept)
    for value in graph.output:  # logits [batch, 1, vocab] -> [batch, sequence, vocab]
        dims = value.type.tensor_type.shape.dim
        if value.name == "logits" and len(dims) == 3:
            dims[1].Clear()
            dims[1].dim_param = "sequence_length"
    drop = {value.name for value in graph.value_info if value.name in (selected,)}
    infos = [v for v in graph.value_info if v.name not in drop]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return True


def window_session(path: Path, options: Any, providers: list[str]) -> Any:
    """An ONNX Runtime session of ``path`` scoring whole windows (see the module docstring); a
    model without the last-position selection is opened as it is."""
    import onnxruntime as ort

    proto = full_logits_model(path)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
