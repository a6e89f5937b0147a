"""Compare ``gguf_blocks`` forms on a real GGUF file, on onnxruntime-genai's builder graph.

Not a test (minutes per model). Builds the fp32 generation graph of the GGUF (cached in the
work folder: ``save_gguf_as_hf`` + ``build_decoder``), runs the pass once per config, then with
plain ONNX Runtime sessions (empty past for a window, the present fed back for a decode step):

- size of each variant vs the GGUF file;
- latency medians, the sessions interleaved round by round: a 64-token prefill (empty past) and
  a one-token decode step after a 64-token past;
- quality vs the fp32 graph on windows of the SDK's English texts: top-1 next-token agreement,
  largest logit difference, and whether 32 greedy tokens from two prompts are identical.

    HF_HUB_OFFLINE=1 .venv/bin/python services/optimizer/scripts/gguf_forms_bench.py \\
        --gguf model.gguf --work /tmp/bench [--config '{"wide_codes": "int8"}' ...] \\
        [--threads 2] [--rounds 15] [--windows 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_CONFIGS = [
    {"accuracy_level": 0, "wide_codes": "split4"},
    {"accuracy_level": 0, "wide_codes": "int8"},
    {"accuracy_level": 0, "wide_codes": "dense"},
    {"accuracy_level": 4, "wide_codes": "split4"},
    {"accuracy_level": 4, "wide_codes": "int8"},
    {"accuracy_level": 4, "wide_codes": "dense"},
]
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "To make a good cup of tea, first",
]


def build_fp32(gguf: Path, work: Path) -> Path:
    from slmops_optimizer.generation.build import build_decoder
    from slmops_optimizer.gguf.loader import save_gguf_as_hf

    model = work / "fp32" / "model.onnx"
    if not model.is_file():
        hf_dir = save_gguf_as_hf(gguf, work / "hf", scratch_dir=work)
        build_decoder(hf_dir, work / "fp32", work / "builder-cache")
        shutil.rmtree(hf_dir, ignore_errors=True)
    return model


def run_pass(gguf: Path, fp32: Path, config: dict[str, Any], folder: Path) -> tuple[Path, Any]:
    from slmops_optimizer.passes import OnnxModel, PassContext, SourceModel
    from slmops_optimizer.passes.gguf_blocks import GgufBlocks

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    ctx = PassContext(
        work_dir=folder,
        source=SourceModel("gguf", gguf, "text-generation", "sha256:bench"),
        intra_op_threads=2,
    )
    started = time.perf_counter()
    out = GgufBlocks.from_config(config).run(OnnxModel(fp32), ctx)
    print(f"  pass {json.dumps(config)}: {time.perf_counter() - started:.0f} s")
    for line in ctx.log:
        print(f"    {line[:300]}")
    return out.path, ctx


class Decoder:
    """A plain ONNX Runtime session of a builder graph, fed empty or given pasts."""

    def __init__(self, path: Path, threads: int, head_size: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        started = time.perf_counter()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.load_s = time.perf_counter() - started
        self.head_size = head_size
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past")]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None) -> Any:
        length = 0 if past is None else next(iter(past.values())).shape[2]
        feed: dict[str, np.ndarray] = {
            "input_ids": ids,
            "attention_mask": np.ones((ids.shape[0], length + ids.shape[1]), dtype=np.int64),
        }
        for spec in self.past_inputs:
            if past is None:
                feed[spec.name] = np.zeros(
                    (ids.shape[0], spec.shape[1], 0, self.head_size), np.float32
                )
            else:
                feed[spec.name] = past[spec.name]
        results = self.session.run(None, feed)
        present = {
            name.replace("present", "past_key_values"): value
            for name, value in zip(self.outputs, results, strict=True)
            if name.startswith("present")
        }
        return results[0], present

    def greedy(self, ids: list[int], steps: int) -> list[int]:
        logits, past = self.run(np.asarray([ids], dtype=np.int64))
        out = [int(logits[0, -1].argmax())]
        for _ in range(steps - 1):
            logits, past = self.run(np.asarray([[out[-1]]], dtype=np.int64), past)
            out.append(int(logits[0, -1].argmax()))
        return out


def windows(tokenizer: Any, bos: int | None, count: int, length: int = 64) -> list[list[int]]:
    from slmops.evaldata import default_texts

    ids: list[int] = []
    for text in default_texts():
        ids.extend(tokenizer.encode(" " + text).ids)
    step = length - (1 if bos is not None else 0)
    out = []
    for i in range(count):
        chunk = ids[i * step : (i + 1) * step]
        out.append(([bos] if bos is not None else []) + chunk)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--config", action="append", type=json.loads)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--reuse", action="store_true", help="reuse variants already built")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    configs = args.config or DEFAULT_CONFIGS
    args.work.mkdir(parents=True, exist_ok=True)
    fp32 = build_fp32(args.gguf, args.work)
    genai = json.loads((fp32.parent / "genai_config.json").read_text())["model"]
    head_size = int(genai["decoder"]["head_size"])
    bos = genai.get("bos_token_id")
    tokenizer = Tokenizer.from_file(str(fp32.parent / "tokenizer.json"))

    variants: dict[str, Path] = {}
    for index, config in enumerate(configs):
        folder = args.work / f"variant-{index}"
        label = f"acc{config.get('accuracy_level', 0)}/{config.get('wide_codes', 'split4')}"
        found = sorted(folder.glob("*/model.onnx"))
        if args.reuse and found:
            variants[label] = found[-1]
            continue
        path, ctx = run_pass(args.gguf, fp32, config, folder)
        (folder / "tensor_map.json").write_text(json.dumps(ctx.details, indent=1))
        variants[label] = path

    gguf_mb = args.gguf.stat().st_size / 1e6
    print(f"GGUF {args.gguf.name}: {gguf_mb:.1f} MB")
    decoders = {"fp32": Decoder(fp32, args.threads, head_size)}
    for label, path in variants.items():
        decoders[label] = Decoder(path, args.threads, head_size)

    texts = windows(tokenizer, bos, args.windows)
    reference = [decoders["fp32"].run(np.asarray([w], dtype=np.int64))[0][0] for w in texts]
    prompts = [([bos] if bos is not None else []) + tokenizer.encode(p).ids for p in PROMPTS]
    greedy_ref = [decoders["fp32"].greedy(p, 32) for p in prompts]
    quality: dict[str, tuple[float, float, bool]] = {}
    for label, decoder in decoders.items():
        agreements: list[float] = []
        worst = 0.0
        for window, ref in zip(texts, reference, strict=True):
            got = decoder.run(np.asarray([window], dtype=np.int64))[0][0]
            agreements.append(float((got.argmax(-1) == ref.argmax(-1)).mean()))
            worst = max(worst, float(np.abs(got - ref).max()))
        same = all(decoder.greedy(p, 32) == g for p, g in zip(prompts, greedy_ref, strict=True))
        quality[label] = (float(np.mean(agreements)), worst, same)

    prefill_ids = np.asarray([texts[0]], dtype=np.int64)
    pasts = {label: d.run(prefill_ids)[1] for label, d in decoders.items()}
    step_ids = np.asarray([[texts[1][0]]], dtype=np.int64)
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "step": []} for k in decoders}
    for _ in range(args.rounds):
        for label, decoder in decoders.items():
            started = time.perf_counter()
            decoder.run(prefill_ids)
            times[label]["prefill"].append(time.perf_counter() - started)
            started = time.perf_counter()
            decoder.run(step_ids, pasts[label])
            times[label]["step"].append(time.perf_counter() - started)

    print(
        f"{'variant':<14} {'MB':>7} {'xGGUF':>6} {'load s':>7} {'prefill64 ms':>13} "
        f"{'step ms':>8} {'top1':>6} {'max|dlogit|':>12} greedy"
    )
    for label, decoder in decoders.items():
        path = fp32 if label == "fp32" else variants[label]
        size = sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith("model"))
        agree, worst_diff, same = quality[label]
        print(
            f"{label:<14} {size / 1e6:7.1f} {size / 1e6 / gguf_mb:6.2f} {decoder.load_s:7.1f} "
            f"{statistics.median(times[label]['prefill']) * 1e3:13.1f} "
            f"{statistics.median(times[label]['step']) * 1e3:8.2f} {agree:6.3f} "
            f"{worst_diff:12.4f} {'same' if same else 'DIFFERS'}"
        )


if __name__ == "__main__":
    main()
