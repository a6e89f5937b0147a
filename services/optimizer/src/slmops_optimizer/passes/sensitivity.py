"""Which nodes to keep in higher precision when a quantized candidate misses its quality floor,
and the cumulative refinement ladders the accuracy-aware search climbs.

Node names come from the graph alone (no run): the lm_head by the ``logits`` output, layers by
the index exporters put in node names, FFN down-projections by the activation feeding them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmops_optimizer.passes.base import PassConfig, Refinement
from slmops_optimizer.passes.onnx_io import load_model

#: Graph output name of a decoder's next-token scores (what ``convert`` exports).
LOGITS_OUTPUT = "logits"
#: Ops that carry a weight matrix: the ones quantizers and pruning act on.
WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Attention", "MatMulNBits", "MatMulInteger"})
#: Ops between the lm_head MatMul and the ``logits`` output that leave its meaning unchanged
#: (bias, casts, reshapes, soft-capping).
_PASS_THROUGH_OPS = frozenset(
    {"Add", "Cast", "Reshape", "Identity", "Transpose", "Squeeze", "Unsqueeze", "Slice"}
    | {"Mul", "Div", "Tanh"}  # soft-capping: tanh(x / c) * c
)
#: Activation functions (or the op that marks one in a decomposed export: Erf in GELU).
_ACTIVATION_OPS = frozenset(
    {"Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Softplus"}
)
#: Where the walk back from a MatMul input stops: the previous weight op, norms, softmax.
_NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization"}
_WALL_OPS = WEIGHT_OPS | _NORM_OPS | {f"Skip{op}" for op in _NORM_OPS} | {"Softmax"}
#: Layer index in exporter node names: "/layers.0/", "/encoder/layer.0/", "/h.3/", "/blocks.1/".
_LAYER_RE = re.compile(r"(?:^|[/.])(?:layers|layer|h|blocks|block)\.(\d+)(?:[/.]|$)")


def sensitive_nodes(model_path: Path) -> dict[str, list[str]]:
    """Names of the weight nodes most sensitive to quantization: ``lm_head`` (the MatMul that
    produces the ``logits`` output, possibly through a bias/cast/reshape), ``first_layer`` and
    ``last_layer`` (weight nodes of the lowest and highest layer index in their names),
    ``post_activation`` (MatMuls whose input comes out of an activation function)."""
    graph = load_model(model_path, "sensitive_nodes", with_weights=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    lm_head: list[str] = []
    frontier = [o.name for o in graph.output if o.name == LOGITS_OUTPUT]
    for _ in range(6):  # a short walk: the head sits right before the output
        nodes = [producer[t] for t in frontier if t in producer]
        heads = [n.name for n in nodes if n.op_type in WEIGHT_OPS]
        if heads:
            lm_head = heads
            break
        frontier = [n.input[0] for n in nodes if n.op_type in _PASS_THROUGH_OPS and n.input]
    layers: dict[int, list[str]] = {}
    for node in graph.node:
        match = _LAYER_RE.search(node.name)
        if match and node.op_type in WEIGHT_OPS and node.name not in lm_head:
            layers.setdefault(int(match.group(1)), []).append(node.name)
    first = layers[min(layers)] if layers else []
    last = layers[max(layers)] if len(layers) > 1 else []
    return {
        "lm_head": lm_head,
        "first_layer": first,
        "last_layer": last,
        "post_activation": _post_activation(graph, producer),
    }


def _post_activation(graph: Any, producer: dict[str, Any]) -> list[str]:
    """Weight MatMuls fed by an activation function (the FFN down-projections): their inputs
    carry the outliers that a per-tensor INT8 activation scale cannot hold (on MiniLM, static
    QDQ cosine 0.93 with them quantized, 0.99 without)."""
    weights = {init.name for init in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        if node.input[1] not in weights:
            continue
        frontier, seen = [node.input[0]], 0
        while frontier and seen < 6:  # a few hops back, never past another weight op or norm
            feeder = producer.get(frontier.pop())
            seen += 1
            if feeder is None or feeder.op_type in _WALL_OPS:
                continue
            if feeder.op_type in _ACTIVATION_OPS:
                found.append(node.name)
                break
            frontier.extend(feeder.input)
    return found


#: One rung of a refinement ladder: what changed, and the config updates given the rung below.
Rung = tuple[str, Callable[[Any], dict[str, Any]]]


def refinement_ladder(config: PassConfig, rungs: list[Rung]) -> list[Refinement]:
    """Cumulative refinements: each rung applied on top of the previous ones and validated;
    rungs that change nothing (already in the config, no such nodes) are left out."""
    ladder: list[Refinement] = []
    current = config
    for description, change in rungs:
        updated = type(current).model_validate({**current.model_dump(), **change(current)})
        if updated != current:
            excluded = len(getattr(updated, "nodes_to_exclude", ()))
            keeps_fp32 = excluded > len(getattr(current, "nodes_to_exclude", ()))
            ladder.append(Refinement(description, updated, keeps_fp32))
            current = updated
    return ladder


def excluding(names: list[str]) -> Callable[[Any], dict[str, Any]]:
    """A rung update adding ``names`` to the config's ``nodes_to_exclude``."""
    return lambda config: {"nodes_to_exclude": sorted({*config.nodes_to_exclude, *names})}
