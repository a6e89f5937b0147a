"""Which output of an encoder holds its embeddings, and how it becomes one vector per text.

An encoder export may have several outputs: a plain Hugging Face export gives
``last_hidden_state`` (batch, seq, hidden) and often ``pooler_output`` (batch, hidden); a
sentence-transformers export gives ``sentence_embedding`` (batch, hidden), already pooled and
normalised, beside ``token_embeddings`` (batch, seq, hidden), in any order. Assuming "the
first output is token embeddings" crashes on the second kind, so every service decides with
this one function: the registry at publish time (from the graph's declared outputs), the
optimizer before its quick score (and it stamps the choice into the variant's metadata), the
validator's parity gate and the gateways (from that metadata).

The rule, for ``feature-extraction`` models only (a classifier's logits are not embeddings):

1. An output the publisher named (``slmops publish --output NAME``) always wins; it must exist
   and be a float tensor of rank 2 or 3.
2. Otherwise the candidates are the float outputs of rank 3 (token embeddings, pooled here) or
   rank 2 (one vector per text, used as is), narrowed to one rank by a ``--pooling`` hint. A
   name in :data:`PREFERRED_NAMES` decides, earliest first:

   - ``sentence_embedding`` and its spellings: the model's own sentence vector, as its authors
     define it (pooling, dense layers and normalisation included), so nothing here can do
     better;
   - ``last_hidden_state``, ``token_embeddings``, ``hidden_states``: token embeddings, pooled
     with the attention-masked mean, which is how sentence-transformers pools its mean-pooling
     models such as all-MiniLM-L6-v2 and the definition ``slmops.quality`` was written for;
   - ``pooler_output`` last: BERT's pooler is a tanh layer over the first token trained for
     next-sentence prediction, a poor sentence embedding (sentence-transformers ignores it);
     it is used only when nothing better exists.

3. Without a known name, a single candidate is the choice. Several candidates are ambiguous:
   refused with :class:`EmbeddingChoiceError`, whose message lists the outputs with their
   shapes and names the flags to pass. Guessing would score (and ship) the wrong vector.

Pure numpy and plain data: the output descriptions come from the caller (the ``onnx`` graph,
an ONNX Runtime session, or the registry's own protobuf reader).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast, get_args

import numpy as np
import numpy.typing as npt

from slmops.events.payloads import Pooling
from slmops.quality import FloatArray, IntArray, mean_pooled

#: Variant metadata keys (ONNX ``metadata_props``) the optimizer stamps and readers honour.
METADATA_OUTPUT = "slmops.embedding_output"
METADATA_POOLING = "slmops.pooling"
POOLINGS: tuple[str, ...] = get_args(Pooling)
#: Known output names, best first (see the module docstring for why this order).
PREFERRED_NAMES: tuple[str, ...] = (
    "sentence_embedding",
    "sentence_embeddings",
    "text_embeds",
    "embeddings",
    "embedding",
    "last_hidden_state",
    "token_embeddings",
    "hidden_states",
    "pooler_output",
)
FLOAT_TYPES = frozenset({"float", "float16", "double", "bfloat16"})
#: TensorProto.DataType codes → the names ONNX Runtime spells in ``tensor(<name>)``.
_ONNX_TYPES = {1: "float", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32",
               7: "int64", 8: "string", 9: "bool", 10: "float16", 11: "double", 12: "uint32",
               13: "uint64", 16: "bfloat16"}  # fmt: skip
_FIX = (
    "say which output holds the embeddings with `slmops publish --output NAME "
    "[--pooling mean|cls|none]` (POST /v1/models: embedding_output, pooling)"
)

Dim = int | str | None


class EmbeddingChoiceError(ValueError):
    """The model's outputs do not say which one holds the embeddings, or the hint is wrong.
    The message names every output with its shape and the flag that resolves it."""


@dataclass(frozen=True)
class OutputInfo:
    """One graph output as declared: ``shape`` None when even the rank is unknown; a dim is
    an int, a symbolic name, or None."""

    name: str
    shape: tuple[Dim, ...] | None
    elem_type: str  # "float", "float16", "int64", ...

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape or ("?",))
        return f"{self.name} ({dims}) {self.elem_type}"


@dataclass(frozen=True)
class EmbeddingChoice:
    """The output to run and how its values become one vector per text."""

    output: str
    index: int  # its position among the graph's outputs
    pooling: Pooling
    reason: str  # why this output: for logs and reports

    def metadata(self) -> dict[str, str]:
        """What the optimizer stamps into the variant (read back by :func:`hints_from_metadata`)."""
        return {METADATA_OUTPUT: self.output, METADATA_POOLING: self.pooling}

    def pooled(self, array: FloatArray, attention_mask: IntArray) -> npt.NDArray[np.float64]:
        return pool(array, attention_mask, self)


def onnx_type_name(code: int) -> str:
    """The name of an ONNX ``TensorProto.DataType`` code ("float" for 1)."""
    return _ONNX_TYPES.get(code, f"type{code}")


def outputs_from_onnx(graph_outputs: Iterable[Any]) -> list[OutputInfo]:
    """From ``onnx`` ``ValueInfoProto`` messages (``model.graph.output``), duck-typed: no onnx
    import here. A non-tensor output (sequence, map) gets elem_type "non-tensor"."""
    infos = []
    for value in graph_outputs:
        if not value.type.HasField("tensor_type"):
            infos.append(OutputInfo(value.name, None, "non-tensor"))
            continue
        tensor = value.type.tensor_type
        shape: tuple[Dim, ...] | None = None
        if tensor.HasField("shape"):
            shape = tuple(_onnx_dim(d) for d in tensor.shape.dim)
        infos.append(OutputInfo(value.name, shape, onnx_type_name(int(tensor.elem_type))))
    return infos


def _onnx_dim(dim: Any) -> Dim:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return str(dim.dim_param) if dim.HasField("dim_param") else None


def outputs_from_ort(node_args: Iterable[Any]) -> list[OutputInfo]:
    """From ONNX Runtime ``session.get_outputs()`` (``NodeArg``: name, shape, "tensor(float)")."""
    infos = []
    for arg in node_args:
        kind = str(arg.type)
        elem = kind[len("tensor(") : -1] if kind.startswith("tensor(") else "non-tensor"
        shape = None if arg.shape is None else tuple(arg.shape)
        infos.append(OutputInfo(str(arg.name), shape, elem))
    return infos


def hints_from_metadata(props: Mapping[str, str]) -> tuple[str | None, Pooling | None]:
    """(output name, pooling) stamped in a model's metadata; (None, None) when absent."""
    pooling = props.get(METADATA_POOLING) or None
    what = f"the model's metadata {METADATA_POOLING}"
    return props.get(METADATA_OUTPUT) or None, _as_pooling(pooling, what)


def _as_pooling(value: str | None, what: str = "pooling") -> Pooling | None:
    if value is not None and value not in POOLINGS:
        raise EmbeddingChoiceError(f"{what} {value!r} is not one of {', '.join(POOLINGS)}")
    return cast("Pooling | None", value)


def choose_embedding_output(
    outputs: list[OutputInfo], *, name: str | None = None, pooling: str | None = None
) -> EmbeddingChoice:
    """The output holding the embeddings and its pooling (rules in the module docstring).

    ``name`` and ``pooling`` are the publisher's hints (None: decided by shape and name).
    """
    hint = _as_pooling(pooling)
    if not outputs:
        raise EmbeddingChoiceError("the model declares no outputs")
    if name is not None:
        return _named(outputs, name, hint)
    wanted_rank = None if hint is None else (2 if hint == "none" else 3)
    candidates = [
        (i, o) for i, o in enumerate(outputs)
        if o.is_float and o.rank in (2, 3) and wanted_rank in (None, o.rank)
    ]  # fmt: skip
    if not candidates:
        return _none_usable(outputs, hint)
    by_name = {o.name.lower(): (i, o) for i, o in candidates}
    for preferred in PREFERRED_NAMES:
        if preferred in by_name:
            index, out = by_name[preferred]
            return _chosen(out, index, hint, f"preferred name {out.name!r}")
    if len(candidates) == 1:
        index, out = candidates[0]
        return _chosen(out, index, hint, "the only float output of rank 2 or 3")
    listed = "; ".join(o.describe() for _, o in candidates)
    raise EmbeddingChoiceError(
        f"the model has {len(candidates)} outputs that could hold the embeddings and none has a "
        f"known name ({', '.join(PREFERRED_NAMES[:3])}, ...): {listed}; {_FIX}"
    )


def _chosen(out: OutputInfo, index: int, hint: Pooling | None, why: str) -> EmbeddingChoice:
    pooling: Pooling = "none" if out.rank == 2 else "cls" if hint == "cls" else "mean"
    role = {"none": "already one vector per text", "mean": "token embeddings, mean-pooled",
            "cls": "token embeddings, first token"}[pooling]  # fmt: skip
    return EmbeddingChoice(out.name, index, pooling, f"{why} ({role})")


def _named(outputs: list[OutputInfo], name: str, pooling: Pooling | None) -> EmbeddingChoice:
    index = next((i for i, o in enumerate(outputs) if o.name == name), None)
    if index is None:
        listed = "; ".join(o.describe() for o in outputs)
        raise EmbeddingChoiceError(
            f"the model has no output named {name!r}; its outputs: {listed}; pass one of these "
            "names to --output (embedding_output)"
        )
    out = outputs[index]
    if not out.is_float:
        raise EmbeddingChoiceError(
            f"output {out.describe()} is not a float tensor, so it holds no embeddings; "
            "pass another --output"
        )
    why = "named by the publisher"
    if out.rank is None:
        if pooling is None:
            raise EmbeddingChoiceError(
                f"output {name!r} declares no shape, so its pooling cannot be told from it: "
                "pass --pooling mean|cls (token embeddings) or none (one vector per text)"
            )
        return EmbeddingChoice(name, index, pooling, why)
    if out.rank == 3 and pooling == "none":
        raise EmbeddingChoiceError(
            f"output {out.describe()} holds one vector per token (batch, seq, hidden); "
            "--pooling none applies to an already pooled (batch, hidden) output: pass "
            "--pooling mean or cls, or name a pooled output"
        )
    if out.rank == 2 and pooling in ("mean", "cls"):
        raise EmbeddingChoiceError(
            f"output {out.describe()} is already one vector per text (batch, hidden); "
            f"--pooling {pooling} needs token embeddings (batch, seq, hidden): pass "
            "--pooling none, or name a token-embeddings output"
        )
    if out.rank in (2, 3):
        return _chosen(out, index, pooling, why)
    raise EmbeddingChoiceError(
        f"output {out.describe()} has rank {out.rank}; embeddings are (batch, hidden) or "
        "(batch, seq, hidden): pass another --output"
    )


def _none_usable(outputs: list[OutputInfo], pooling: Pooling | None) -> EmbeddingChoice:
    listed = "; ".join(o.describe() for o in outputs)
    if pooling is not None:
        shape = "(batch, hidden)" if pooling == "none" else "(batch, seq, hidden)"
        raise EmbeddingChoiceError(
            f"--pooling {pooling} needs a float output shaped {shape} and the model has none: "
            f"{listed}; pass another --pooling, or --output NAME"
        )
    unknown = [o for o in outputs if o.is_float and o.rank is None]
    if unknown:
        raise EmbeddingChoiceError(
            f"no output declares the shape of embeddings (float, (batch, hidden) or (batch, "
            f"seq, hidden)); {', '.join(o.name for o in unknown)} declare no shape at all: "
            f"{listed}; {_FIX}"
        )
    raise EmbeddingChoiceError(
        f"no output holds embeddings: a feature-extraction model needs a float output shaped "
        f"(batch, hidden) or (batch, seq, hidden), and its outputs are: {listed}; publish it "
        "with the task it has (e.g. text-classification), or export the embeddings as an output"
    )


def pool(
    array: FloatArray, attention_mask: IntArray, choice: EmbeddingChoice
) -> npt.NDArray[np.float64]:
    """One vector per row of ``array``, the chosen output's value on one batch.

    ``mean``: attention-masked mean of (batch, seq, hidden) (``slmops.quality.mean_pooled``);
    ``cls``: the first token's vector; ``none``: (batch, hidden) as is. A value whose rank
    contradicts the choice (a graph that declared one shape and returns another) raises
    :class:`EmbeddingChoiceError` rather than broadcasting into a wrong figure.
    """
    want = 2 if choice.pooling == "none" else 3
    if array.ndim != want:
        raise EmbeddingChoiceError(
            f"output {choice.output!r} returned shape {tuple(array.shape)} at run time; pooling "
            f"{choice.pooling!r} expects rank {want}: {_FIX}"
        )
    if choice.pooling == "mean":
        if attention_mask.shape != array.shape[:2]:
            raise EmbeddingChoiceError(
                f"output {choice.output!r} has shape {tuple(array.shape)}, which does not match "
                f"the attention mask {tuple(attention_mask.shape)} (batch, seq): it is not token "
                f"embeddings; {_FIX}"
            )
        return mean_pooled(array, attention_mask)
    if choice.pooling == "cls":
        return np.asarray(array[:, 0, :], dtype=np.float64)
    return np.asarray(array, dtype=np.float64)
