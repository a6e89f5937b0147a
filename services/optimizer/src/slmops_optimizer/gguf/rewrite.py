"""Replace MatMul / Gather nodes by ONNX Runtime's block-quantized operators reading packs.

The value of a mapped weight is ``s * (code - mid) + c`` (:mod:`slmops_optimizer.gguf.mapping`):

- MatMul ``Y = X @ W`` → ``MatMulNBits(X, codes, s)`` (two for ``split4``:
  ``16 * MatMulNBits(X, high, s) + MatMulNBits(X, low, s)``), plus ``blocksum(X) @ c^T`` when
  the pack has a correction; ``dense`` packs → an fp32 MatMul on ``W`` built from the codes.
- A weight whose rows are several GGUF tensors (a packed qkv) → runs of consecutive segments
  that fit one node (same form, bits, block size) concatenated along N, and a Concat of the runs.
- Gather ``E[ids]`` → GatherBlockQuantized on the very codes a tied LM head reads (two and a sum
  for ``split4``), plus the gathered rows of ``c``.

Weights are exact (:mod:`~slmops_optimizer.gguf.mapping`); the compute rounds like any GEMM
with its sums reassociated: ``split4`` adds the two planes' dot products, the correction adds
``blocksum(X) @ c^T`` to the MatMulNBits output (float32 either way, measured max logit
differences of 1e-4..5e-3 vs the fp32 graph on SmolLM2 and Gemma 3).

Everything computed from initializers only (float32 scales from the file's float16 ``d`` times
the integer sub-block scales, ``c``, the concatenated scales of a qkv run, a dense weight) is a
chain of plain ONNX nodes that ONNX Runtime folds into one initializer when the session loads:
the file keeps the compact form, MatMulNBits still gets constant (prepacked) weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from slmops_optimizer.gguf.blocks import BlockValues
from slmops_optimizer.gguf.mapping import WeightPack, unpack_codes

MS_DOMAIN = "com.microsoft"


def tensor_base_name(tensor: Any) -> str:
    name = tensor if isinstance(tensor, str) else tensor.name
    return f"gguf.{name.removesuffix('.weight')}"


def _merged_name(bases: Sequence[str]) -> str:
    """``gguf.blk.0.attn_q+attn_k+attn_v`` for a run of segments."""
    first, *rest = bases
    return "+".join([first, *(b.rsplit(".", 1)[-1] for b in rest)])


def _run_key(pack: WeightPack) -> tuple[Any, ...]:
    """Packs with equal keys can share one node (concatenated along N)."""
    if pack.form == "dense":
        return ("dense", pack.k)
    return (pack.form, pack.bits, pack.block_size, pack.k, pack.zero_points is None)


class Rewriter:
    """Builds the replacement nodes, sharing every pack's initializers (and the values computed
    from them) between all the nodes that use it."""

    def __init__(self, graph: Any, accuracy_level: int | None) -> None:
        self.graph = graph
        self.accuracy_level = accuracy_level  # of 4-bit nodes; 8-bit ones always use 4
        self.initializers: list[Any] = []
        self._used: set[str] = {i.name for i in graph.initializer}
        self._used.update(n for node in graph.node for n in node.output)
        self._used.update(i.name for i in graph.input)
        self._cache: dict[tuple[int, str], str] = {}  # (id(pack), what) → value name
        self._packs: dict[int, WeightPack] = {}  # keeps the ids of _cache valid
        self._blocksum: dict[tuple[str, int, int], str] = {}
        self._block_matrix: dict[tuple[int, int], str] = {}
        self._counter = 0

    # -- names and constants ------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        name = base
        while name in self._used:
            self._counter += 1
            name = f"{base}_{self._counter}"
        self._used.add(name)
        return name

    def constant(self, base: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, domain: str = "", **attrs: Any) -> Any:
        from onnx import helper

        output = self.fresh(base)
        made = helper.make_node(op, inputs, [output], name=self.fresh(f"{base}/{op}"), **attrs)
        if domain:
            made.domain = domain
        return made

    def _shape(self, base: str, dims: Sequence[int]) -> str:
        return self.constant(base, np.asarray(list(dims), dtype=np.int64))

    def _cached(self, pack: WeightPack, what: str) -> str | None:
        return self._cache.get((id(pack), what))

    def _remember(self, pack: WeightPack, what: str, name: str) -> str:
        self._packs[id(pack)] = pack
        self._cache[(id(pack), what)] = name
        return name

    # -- a pack's tensors ---------------------------------------------------------------------

    def plane(self, pack: WeightPack, index: int, base: str) -> str:
        """Initializer of code plane ``index`` (``split4``: 0 high, 1 low)."""
        what = f"plane{index}"
        found = self._cached(pack, what)
        if found is None:
            suffix = {1: f"q{pack.bits}", 2: ("q4h", "q4l")[index]}[len(pack.planes)]
            initializer = self.constant(f"{base}.{suffix}", pack.planes[index])
            found = self._remember(pack, what, initializer)
        return found

    def _block_values(self, values: BlockValues, base: str, out: list[Any]) -> str:
        """float32 ``[rows, n_blocks]`` from the stored ``base`` (times ``factor``)."""
        from onnx import TensorProto

        name = self.constant(base, values.base)
        if values.base.dtype != np.float32:
            cast = self.node("Cast", [name], f"{base}_f32", to=TensorProto.FLOAT)
            out.append(cast)
            name = cast.output[0]
        if values.factor is None:
            return name
        rows, n_blocks, group = values.rows, values.n_blocks, values.group
        factor = self.constant(f"{base}_factor", values.factor)
        factor_f = self.node("Cast", [factor], f"{base}_factor_f32", to=TensorProto.FLOAT)
        grouped = self.node(
            "Reshape",
            [factor_f.output[0], self._shape(f"{base}_grouped_shape", [rows, -1, group])],
            f"{base}_grouped",
        )
        column = self.node("Unsqueeze", [name, self._shape(f"{base}_axis", [-1])], f"{base}_column")
        product = self.node("Mul", [grouped.output[0], column.output[0]], f"{base}_product")
        flat = self.node(
            "Reshape",
            [product.output[0], self._shape(f"{base}_flat_shape", [rows, n_blocks])],
            f"{base}_values",
        )
        out.extend([factor_f, grouped, column, product, flat])
        return str(flat.output[0])

    def scales(self, pack: WeightPack, base: str, out: list[Any]) -> str:
        """float32 ``[N, n_blocks]`` scales."""
        found = self._cached(pack, "scales")
        if found is None:
            found = self._remember(
                pack, "scales", self._block_values(pack.scales, f"{base}.scales", out)
            )
        return found

    def correction(self, pack: WeightPack, base: str, out: list[Any]) -> str | None:
        """float32 ``[N, n_blocks]`` ``c = offsets + shift * scales``; None when zero."""
        if not pack.has_correction:
            return None
        found = self._cached(pack, "correction")
        if found is not None:
            return found
        terms: list[str] = []
        if pack.offsets is not None:
            terms.append(self._block_values(pack.offsets, f"{base}.offsets", out))
        if pack.shift:
            factor = self.constant(f"{base}.shift", np.asarray(float(pack.shift), np.float32))
            shifted = self.node("Mul", [self.scales(pack, base, out), factor], f"{base}.shifted")
            out.append(shifted)
            terms.append(shifted.output[0])
        value = terms[0]
        if len(terms) == 2:
            added = self.node("Add", terms, f"{base}.correction")
            out.append(added)
            value = added.output[0]
        return self._remember(pack, "correction", value)

    def correction_t(self, pack: WeightPack, base: str, out: list[Any]) -> str:
        """``c^T`` ``[n_blocks, N]`` (zeros when the pack has no correction)."""
        found = self._cached(pack, "correction_t")
        if found is not None:
            return found
        correction = self.correction(pack, base, out)
        if correction is None:
            zeros = self.node(
                "ConstantOfShape",
                [self._shape(f"{base}.zeros_shape", [pack.n_blocks, pack.n])],
                f"{base}.correction_t",
            )
            out.append(zeros)
            value = zeros.output[0]
        else:
            transposed = self.node("Transpose", [correction], f"{base}.correction_t", perm=[1, 0])
            out.append(transposed)
            value = transposed.output[0]
        return self._remember(pack, "correction_t", value)

    def zero_points(self, pack: WeightPack, base: str) -> str | None:
        if pack.zero_points is None:
            return None
        found = self._cached(pack, "zero_points")
        if found is None:
            found = self._remember(
                pack, "zero_points", self.constant(f"{base}.zero_points", pack.zero_points)
            )
        return found

    def _block_sums(self, x: str, k: int, block_size: int, out: list[Any]) -> str:
        """``[..., K]`` → ``[..., K / block_size]`` sums, once per input value."""
        key = (x, k, block_size)
        if key not in self._blocksum:
            if (k, block_size) not in self._block_matrix:
                n_blocks = -(-k // block_size)
                ones = np.zeros((k, n_blocks), dtype=np.float32)
                ones[np.arange(k), np.arange(k) // block_size] = 1.0
                self._block_matrix[(k, block_size)] = self.constant(
                    f"gguf_blocks.block_sum_{k}x{block_size}", ones
                )
            summed = self.node(
                "MatMul", [x, self._block_matrix[(k, block_size)]], "gguf_blocks.block_sums"
            )
            out.append(summed)
            self._blocksum[key] = summed.output[0]
        return self._blocksum[key]

    # -- MatMul -------------------------------------------------------------------------------

    def matmul(
        self, node: Any, packs: WeightPack | Sequence[WeightPack], bases: str | Sequence[str]
    ) -> list[Any]:
        """``Y = X @ W`` with ``W``'s rows the packs' rows, in order (one pack: one tensor)."""
        if isinstance(packs, WeightPack):
            packs = [packs]
        if isinstance(bases, str):
            bases = [bases]
        out: list[Any] = []
        x, y = node.input[0], node.output[0]
        runs: list[list[int]] = []
        for index, pack in enumerate(packs):
            if runs and _run_key(packs[runs[-1][0]]) == _run_key(pack):
                runs[-1].append(index)
            else:
                runs.append([index])
        target = y if len(runs) == 1 else None
        parts = [
            self._run([packs[i] for i in run], [bases[i] for i in run], x, out, target)
            for run in runs
        ]
        if len(runs) > 1:
            concat = self.node("Concat", parts, f"{_merged_name(bases)}.concat", axis=-1)
            concat.output[0] = y
            out.append(concat)
        return out

    def _run(
        self,
        packs: list[WeightPack],
        bases: list[str],
        x: str,
        out: list[Any],
        target: str | None,
    ) -> str:
        """One run of segments that fit one node: its output value name (``target`` if set)."""
        first = packs[0]
        name = bases[0] if len(packs) == 1 else _merged_name(bases)
        if first.form == "dense":
            weights = [self._dense_weight(p, b, out) for p, b in zip(packs, bases, strict=True)]
            weight = weights[0]
            if len(weights) > 1:
                joined = self.node("Concat", weights, f"{name}.weight", axis=1)
                out.append(joined)
                weight = joined.output[0]
            return self._finish(self.node("MatMul", [x, weight], f"{name}.matmul"), out, target)

        n = sum(p.n for p in packs)
        planes, scales = self._run_tensors(packs, bases, name, out)
        zero_points = self._run_zero_points(packs, bases, name)
        level = 4 if first.form == "int8" else self.accuracy_level
        attrs: dict[str, Any] = {
            "K": first.k,
            "N": n,
            "bits": first.bits,
            "block_size": first.block_size,
        }
        if level is not None:
            attrs["accuracy_level"] = level
        products = [
            self.node(
                "MatMulNBits",
                [x, plane, scales] + ([zero_points] if zero_points else []),
                f"{name}.matmul",
                domain=MS_DOMAIN,
                **attrs,
            )
            for plane in planes
        ]
        main = products[0]
        if len(products) == 2:  # split4: 16 * high + low
            sixteen = self.constant(f"{name}.sixteen", np.asarray(16.0, dtype=np.float32))
            high = self.node("Mul", [main.output[0], sixteen], f"{name}.matmul_high")
            main = self.node("Add", [high.output[0], products[1].output[0]], f"{name}.matmul_sum")
            out.extend([*products, high])
        if not any(p.has_correction for p in packs):
            return self._finish(main, out, target)
        out.append(main)

        correction_ts = [self.correction_t(p, b, out) for p, b in zip(packs, bases, strict=True)]
        correction_t = correction_ts[0]
        if len(correction_ts) > 1:
            joined = self.node("Concat", correction_ts, f"{name}.correction_t", axis=1)
            out.append(joined)
            correction_t = joined.output[0]
        sums = self._block_sums(x, first.k, first.block_size, out)
        correction = self.node("MatMul", [sums, correction_t], f"{name}.offset_correction")
        out.append(correction)
        exact = self.node("Add", [main.output[0], correction.output[0]], f"{name}.matmul_exact")
        return self._finish(exact, out, target)

    @staticmethod
    def _finish(node: Any, out: list[Any], target: str | None) -> str:
        if target is not None:
            node.output[0] = target
        out.append(node)
        return str(node.output[0])

    def _run_tensors(
        self, packs: list[WeightPack], bases: list[str], name: str, out: list[Any]
    ) -> tuple[list[str], str]:
        """Code planes and float32 scales of a run: the packs' own, or concatenated along N
        (codes as a new initializer, scales by a Concat that is folded at load)."""
        if len(packs) == 1:
            pack, base = packs[0], bases[0]
            planes = [self.plane(pack, i, base) for i in range(len(pack.planes))]
            return planes, self.scales(pack, base, out)
        count = len(packs[0].planes)
        suffixes = [f"q{packs[0].bits}"] if count == 1 else ["q4h", "q4l"]
        planes = [
            self.constant(f"{name}.{suffixes[i]}", np.concatenate([p.planes[i] for p in packs]))
            for i in range(count)
        ]
        scales = [self.scales(p, b, out) for p, b in zip(packs, bases, strict=True)]
        joined = self.node("Concat", scales, f"{name}.scales", axis=0)
        out.append(joined)
        return planes, joined.output[0]

    def _run_zero_points(self, packs: list[WeightPack], bases: list[str], name: str) -> str | None:
        if packs[0].zero_points is None:
            return None
        if len(packs) == 1:
            return self.zero_points(packs[0], bases[0])
        joined = np.concatenate([p.zero_points for p in packs if p.zero_points is not None])
        return self.constant(f"{name}.zero_points", joined)

    def _dense_weight(self, pack: WeightPack, base: str, out: list[Any]) -> str:
        """``W^T`` ``[K, N]`` = ``(codes - zp) * s + c``, built from the stored 8-bit codes by
        nodes on initializers only: folded into one fp32 weight at load (exact: an 8-bit code
        times the scale fits a float32, and ``c`` is added as the mapping computes it)."""
        from onnx import TensorProto

        found = self._cached(pack, "dense")
        if found is not None:
            return found
        codes = self.node(
            "Cast", [self.plane(pack, 0, base)], f"{base}.codes_f32", to=TensorProto.FLOAT
        )
        out.append(codes)
        axis = self._shape(f"{base}.last_axis", [-1])
        if pack.zero_points is None:
            mid = np.asarray(1 << (pack.bits - 1), dtype=np.float32)  # the default zero point
            zp = self.constant(f"{base}.zero_point", mid)
        else:
            unpacked = pack.zero_point_values().astype(np.float32)[..., None]
            zp = self.constant(f"{base}.zero_point", unpacked)
        centred = self.node("Sub", [codes.output[0], zp], f"{base}.centred")
        scale_col = self.node(
            "Unsqueeze", [self.scales(pack, base, out), axis], f"{base}.scale_col"
        )
        scaled = self.node("Mul", [centred.output[0], scale_col.output[0]], f"{base}.scaled")
        out.extend([centred, scale_col, scaled])
        values = scaled.output[0]
        correction = self.correction(pack, base, out)
        if correction is not None:
            column = self.node("Unsqueeze", [correction, axis], f"{base}.correction_col")
            added = self.node("Add", [values, column.output[0]], f"{base}.corrected")
            out.extend([column, added])
            values = added.output[0]
        rows_shape = self._shape(f"{base}.rows_shape", [pack.n, pack.n_blocks * pack.block_size])
        rows = self.node("Reshape", [values, rows_shape], f"{base}.rows")
        out.append(rows)
        dense = rows.output[0]
        if pack.n_blocks * pack.block_size != pack.k:
            sliced = self.node(
                "Slice",
                [
                    dense,
                    self._shape(f"{base}.slice_start", [0]),
                    self._shape(f"{base}.slice_end", [pack.k]),
                    self._shape(f"{base}.slice_axis", [1]),
                ],
                f"{base}.rows_k",
            )
            out.append(sliced)
            dense = sliced.output[0]
        weight = self.node("Transpose", [dense], f"{base}.weight", perm=[1, 0])
        out.append(weight)
        return self._remember(pack, "dense", weight.output[0])

    # -- Gather -------------------------------------------------------------------------------

    def gather(self, node: Any, pack: WeightPack, base: str) -> list[Any]:
        """``E[ids]`` → GatherBlockQuantized on the pack's codes (the very tensors a tied LM
        head's MatMulNBits reads) (+ the gathered rows of the correction)."""
        if pack.n_blocks * pack.block_size != pack.k:
            raise ValueError(f"{base}: K={pack.k} is not a multiple of block {pack.block_size}")
        out: list[Any] = []
        ids, y = node.input[1], node.output[0]
        scales_3d = self._cached(pack, "scales_3d")
        if scales_3d is None:
            shape3 = self._shape(f"{base}.shape_3d", [pack.n, pack.n_blocks, 1])
            reshaped = self.node(
                "Reshape", [self.scales(pack, base, out), shape3], f"{base}.scales_3d"
            )
            out.append(reshaped)
            scales_3d = self._remember(pack, "scales_3d", reshaped.output[0])
        inputs_tail = [scales_3d]
        if pack.zero_points is not None:
            zp = pack.zero_point_values().reshape(pack.n, pack.n_blocks, 1)
            inputs_tail.append(self.constant(f"{base}.zero_points_3d", zp))
        gathered = [
            self.node(
                "GatherBlockQuantized",
                [self.plane(pack, i, base), ids, *inputs_tail],
                f"{base}.gather",
                domain=MS_DOMAIN,
                gather_axis=0,
                quantize_axis=2,
                block_size=pack.block_size,
                bits=pack.bits,
            )
            for i in range(len(pack.planes))
        ]
        out.extend(gathered)
        blocks = gathered[0].output[0]  # [*ids, n_blocks, block_size]
        if len(gathered) == 2:  # split4: 16 * high + low
            sixteen = self.constant(f"{base}.sixteen", np.asarray(16.0, dtype=np.float32))
            high = self.node("Mul", [blocks, sixteen], f"{base}.gather_high")
            both = self.node("Add", [high.output[0], gathered[1].output[0]], f"{base}.gather_sum")
            out.extend([high, both])
            blocks = both.output[0]
        correction = self.correction(pack, base, out)
        if correction is not None:
            picked = self.node("Gather", [correction, ids], f"{base}.row_corrections", axis=0)
            column = self.node(
                "Unsqueeze",
                [picked.output[0], self._shape(f"{base}.gather_axis", [-1])],
                f"{base}.corrections_col",
            )
            added = self.node("Add", [blocks, column.output[0]], f"{base}.gather_exact")
            out.extend([picked, column, added])
            blocks = added.output[0]
        ids_shape = self.node("Shape", [ids], f"{base}.ids_shape")
        width = self._shape(f"{base}.width", [pack.k])
        shape = self.node("Concat", [ids_shape.output[0], width], f"{base}.out_shape", axis=0)
        reshape = self.node("Reshape", [blocks, shape.output[0]], f"{base}.embedding")
        reshape.output[0] = y
        out.extend([ids_shape, shape, reshape])
        return out


__all__ = ["MS_DOMAIN", "Rewriter", "tensor_base_name", "unpack_codes"]
