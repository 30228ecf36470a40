"""`offload bench crosslayer-study`: the cross-layer KV sharing framework, trained at small scale.

Wu, Wu and Tu (NAACL 2025) pair the queries of every layer with the KV of a "KV layer": three
partitions (pizza, sandwich, lasagna) x three target positions (bottom, top, middle), see
`offload.models.shared_kv`. This benchmark reads models trained by `python -m offload.models.train
--layers 6 --recipe study [--kv-sharing PARTITION-TARGET [--kv-layers K]]` (one folder each, the
standard model's `standard`), and measures them side by side on this CPU:

- KV bytes per token: what a transformers cache holds per token after a prefill;
- prefill seconds and decode tokens/s at each context length, ratios to the standard model, every
  model timed in turn within each repetition (medians over `--repeats`);
- full-cache task accuracy (the five tasks of the embedded model; strict protocol: the context
  prefilled, questions and answers fed as decode steps) at each context length;
- perplexity of the last tokens of filler-text windows, fed as decode steps after a prefill.

A model whose layers attend a later layer's KV (top and middle targets) computes a prompt by
iteration (its `forward_passes` + `backward_passes` passes over the span) and decodes exactly one
token at a time; everything here runs the plain model with a transformers cache, the way its own
`generate` does. (The bottom configurations also run through `OffloadedModel`, exactly: the tests
check that.)

    offload bench crosslayer-study --models-dir DIR             # every folder in DIR
    offload bench crosslayer-study --models-dir DIR --quick     # a smoke run

Results: bench/results/crosslayer_study.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from offload.benchmarks import machine

PARTITION_ORDER = ("standard", "pizza", "sandwich", "lasagna")
TARGET_ORDER = ("bottom", "middle", "top")


@dataclass
class StudyRow:
    name: str
    configuration: str  # "standard" or PARTITION-TARGET
    kv_layers: int
    layers: int
    kv_source_layers: list
    params: int
    kv_bytes_per_token: float
    kv_reduction: float  # layers / kv_layers
    prefill_s: dict = field(default_factory=dict)  # context -> median seconds
    decode_tok_s: dict = field(default_factory=dict)  # context -> median tokens/s
    prefill_ratio: dict = field(default_factory=dict)  # context -> this / standard
    decode_ratio: dict = field(default_factory=dict)
    train_step_s: float = math.nan  # forward + backward at 8 x 512 tokens, median
    train_step_ratio: float = math.nan
    accuracy: dict = field(default_factory=dict)  # task -> {context: accuracy}, strict protocol
    forward_accuracy: dict = field(default_factory=dict)  # the same, one teacher-forced forward
    perplexity: float = math.nan
    perplexity_ratio: float = math.nan
    train_wall_s: float = math.nan
    train_command: str = ""


def load_models(models_dir: Path, names: list[str] | None = None):
    """[(name, model, tokenizer, training.json)] for every trained folder (or those in `names`), standard first."""
    from offload.models.embedded import load_embedded_model

    found = []
    for path in sorted(p for p in models_dir.iterdir() if (p / "config.json").is_file()):
        if names is not None and path.name not in names and path.name != "standard":
            continue
        model, tokenizer = load_embedded_model(path)
        meta = json.loads((path / "training.json").read_text()) if (path / "training.json").is_file() else {}
        found.append((path.name, model, tokenizer, meta))
    if not any(name == "standard" for name, *_ in found):
        raise FileNotFoundError(f"{models_dir}: no 'standard' folder; the ratios need the standard model trained "
                                "with the same recipe (python -m offload.models.train --layers N --recipe study "
                                f"--out {models_dir}/standard)")
    depth = {name: model.config.num_hidden_layers for name, model, *_ in found}
    if len(set(depth.values())) > 1:
        raise ValueError(f"{models_dir}: the models have different depths ({depth}); ratios are to the standard model "
                         "of the same depth, so keep each depth in its own folder")
    return sorted(found, key=lambda f: (f[0] != "standard", _order(f[0])))


def _order(name: str) -> tuple:
    """Sort key of a folder name `partition-target[-kvN][-suffix]` (a suffix such as `-m7` names a variant)."""
    configuration, _, kv = name.partition("-kv")
    kv_layers = re.match(r"\d*", kv).group()
    partition, _, target = configuration.partition("-")
    return (int(kv_layers) if kv_layers else 0, PARTITION_ORDER.index(partition) if partition in PARTITION_ORDER else 9,
            TARGET_ORDER.index(target) if target in TARGET_ORDER else 9, name)


def describe(name: str, model) -> dict:
    config = model.config
    sources = list(getattr(config, "kv_source_layers", None) or range(config.num_hidden_layers))
    kv_layers = len(set(sources))
    return {"configuration": name.partition("-kv")[0], "kv_layers": kv_layers, "layers": config.num_hidden_layers,
            "kv_source_layers": sources, "params": sum(p.numel() for p in model.parameters()),
            "kv_reduction": config.num_hidden_layers / kv_layers}


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)


@torch.inference_mode()
def kv_bytes_per_token(model, ids: torch.Tensor) -> float:
    cache = new_cache(model)
    model(ids, past_key_values=cache, use_cache=True)
    return cache_bytes(cache) / ids.shape[1]


@torch.inference_mode()
def time_once(model, ids: torch.Tensor, decode_steps: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of ids [1, T] then `decode_steps` greedy steps."""
    cache = new_cache(model)
    start = time.perf_counter()
    logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    prefill = time.perf_counter() - start
    token = logits.argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(decode_steps):
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    return prefill, decode_steps / (time.perf_counter() - start)


def train_step_seconds(model, ids: torch.Tensor) -> float:
    """Seconds of one training step's forward and backward on ids [B, T] (the prompt's iteration
    with its passes with and without gradients, for top and middle targets)."""
    model.train()
    try:
        start = time.perf_counter()
        model(ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        return time.perf_counter() - start
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def timings(models: list, contexts: list[int], repeats: int, decode_steps: int) -> dict:
    """{name: {context: (median prefill s, median decode tok/s)}, "train": median train-step s at 8 x 512
    tokens}, models interleaved per repetition."""
    from offload.models import embedded

    samples: dict = {name: {n: ([], []) for n in contexts} for name, *_ in models}
    batch = torch.cat([embedded.sample_text(512, seed=400 + i) for i in range(8)])
    steps: dict = {name: [] for name, *_ in models}
    for name, model, *_ in models:  # warm-up
        train_step_seconds(model, batch[:2, :64])
    for _ in range(repeats):
        for name, model, *_ in models:
            steps[name].append(train_step_seconds(model, batch))
    for n in contexts:
        ids = embedded.sample_text(n, seed=300)
        for name, model, *_ in models:  # warm-up
            time_once(model, ids[:, :64], 2)
        for _ in range(repeats):
            for name, model, *_ in models:
                prefill, rate = time_once(model, ids, decode_steps)
                samples[name][n][0].append(prefill)
                samples[name][n][1].append(rate)
    result = {name: {n: (statistics.median(p), statistics.median(r)) for n, (p, r) in per.items()}
              for name, per in samples.items()}
    for name in result:
        result[name]["train"] = statistics.median(steps[name])
    return result


def quality(model, tokenizer, contexts: list[int], samples: int, windows: list[torch.Tensor], scored: int):
    """({task: {context: accuracy}}, the same from one teacher-forced forward, perplexity). The first is
    the strict protocol with the plain model's own cache (questions and answers decoded one token at a
    time); the second scores every answer inside one forward over the whole sample, which for a top or
    middle target is the prompt's iteration, the way it was trained (for the others the two agree)."""
    from offload.crosslayer.evaluation import cached, perplexity
    from offload.crosslayer.evaluation import task_accuracy as strict_accuracy
    from offload.models import tasks
    from offload.models.embedded import task_accuracy

    variant = cached("study", "full cache", model, lambda: new_cache(model))
    accuracy = {task: {n: strict_accuracy(variant, model, tokenizer, task, n, samples, seed=0) for n in contexts}
                for task in tasks.TASKS}
    forward = {task: {n: task_accuracy(model, tokenizer, task, n, samples, seed=0) for n in contexts}
               for task in tasks.TASKS}
    ppl, _ = perplexity(variant, windows, scored)
    return accuracy, forward, ppl


QUALITY_FILE = "crosslayer_study_quality.json"


def cached_quality(path: Path, model, tokenizer, contexts: list[int], samples: int, texts: list[torch.Tensor],
                   scored: int):
    """`quality(...)`, kept in the model's folder and reused while the weights and the settings are
    the same (so a model can be scored as soon as it is trained, beside the others' training)."""
    weights = (path / "model.safetensors").stat()
    key = {"version": 2, "contexts": contexts, "samples": samples, "windows": len(texts),
           "window_tokens": texts[0].shape[1], "scored": scored, "weights": [weights.st_size, weights.st_mtime_ns]}
    record = path / QUALITY_FILE
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved["key"] == key:
            return (*({t: {int(n): a for n, a in per.items()} for t, per in saved[k].items()}
                      for k in ("accuracy", "forward_accuracy")), saved["perplexity"])
    accuracy, forward, ppl = quality(model, tokenizer, contexts, samples, texts, scored)
    record.write_text(json.dumps({"key": key, "accuracy": accuracy, "forward_accuracy": forward, "perplexity": ppl},
                                 indent=1) + "\n")
    return accuracy, forward, ppl


def run(models_dir: Path, contexts: list[int], accuracy_contexts: list[int], samples: int, repeats: int,
        decode_steps: int, windows: int, window_tokens: int, scored: int, progress=print,
        quality_only: bool = False, names: list[str] | None = None) -> list[StudyRow]:
    from offload.models import embedded

    models = load_models(models_dir, names)
    texts = [embedded.sample_text(window_tokens, seed=100 + i) for i in range(windows)]
    rows = []
    for name, model, tokenizer, meta in models:
        start = time.perf_counter()
        accuracy, forward, ppl = cached_quality(models_dir / name, model, tokenizer, accuracy_contexts, samples,
                                                texts, scored)
        row = StudyRow(name=name, **describe(name, model),
                       kv_bytes_per_token=kv_bytes_per_token(model, texts[0][:, :256]), accuracy=accuracy,
                       forward_accuracy=forward, perplexity=ppl, train_wall_s=meta.get("train_wall_s", math.nan),
                       train_command=meta.get("command", ""))
        rows.append(row)
        progress(f"{name:22s} kv layers {row.kv_layers}  ppl {ppl:.3f}  "
                 + "  ".join(f"{t} " + "/".join(f"{a:.2f}" for a in acc.values()) for t, acc in accuracy.items())
                 + f"  ({time.perf_counter() - start:.0f} s)")
    if quality_only:
        return rows
    times = timings(models, contexts, repeats, decode_steps)
    base = next(r for r in rows if r.name == "standard")
    base_times = times["standard"]
    for row in rows:
        row.prefill_s = {n: round(times[row.name][n][0], 4) for n in contexts}
        row.decode_tok_s = {n: round(times[row.name][n][1], 1) for n in contexts}
        row.prefill_ratio = {n: round(times[row.name][n][0] / base_times[n][0], 3) for n in contexts}
        row.decode_ratio = {n: round(times[row.name][n][1] / base_times[n][1], 3) for n in contexts}
        row.perplexity_ratio = row.perplexity / base.perplexity
        row.train_step_s = round(times[row.name]["train"], 4)
        row.train_step_ratio = round(times[row.name]["train"] / base_times["train"], 3)
    return rows


def markdown(rows: list[StudyRow], meta: dict) -> str:
    contexts = list(rows[0].prefill_s)
    accuracy_contexts = list(next(iter(rows[0].accuracy.values())))
    tasks = list(rows[0].accuracy)
    lines = [
        "# Cross-layer KV sharing, trained at small scale (Wu, Wu and Tu's framework)", "",
        f"Command: `{meta['command']}`; machine: {meta['machine']}; torch {meta['torch']}.", "",
        f"Every model is the embedded architecture with {' or '.join(str(n) for n in sorted({r.layers for r in rows}))} "
        "layers (hidden 128, 8 query heads, 2 KV heads of 16), "
        "trained from the same seed with the same data and curriculum (`--recipe study`: 1000 steps at 64 tokens, "
        "200 each at 128, 256 and 512; about 6.5M tokens); the command of each is in its row of the JSON. "
        "KV map: per layer, the layer whose KV it attends. KV B/token: bytes the cache holds per token. "
        f"Prefill and decode: median of {meta['repeats']} runs at each context, every model timed in turn within a "
        f"repetition, {meta['decode_steps']} greedy decode steps after the prefill; train step: forward and backward "
        "at 8 x 512 tokens, timed the same way; ratios to the standard model. "
        f"Accuracy: exact match, {meta['samples']} samples per task and context, the context prefilled and questions "
        f"and answers fed as decode steps. ppl: perplexity of the last {meta['scored']} tokens of "
        f"{meta['windows']} filler windows of {meta['window_tokens']} tokens, fed as decode steps.", "",
        "| model | KV map | KV layers | KV B/token | " + " | ".join(f"prefill x @{n}" for n in contexts) + " | "
        + " | ".join(f"decode x @{n}" for n in contexts) + " | train step x | ppl | ppl ratio |",
        "|---|---|---|---|" + "---|" * (2 * len(contexts)) + "---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {'_'.join(map(str, r.kv_source_layers))} | {r.kv_layers} | "
                     f"{r.kv_bytes_per_token:.0f} | " + " | ".join(f"{r.prefill_ratio[n]:.2f}" for n in contexts)
                     + " | " + " | ".join(f"{r.decode_ratio[n]:.2f}" for n in contexts)
                     + f" | {r.train_step_ratio:.2f} | {r.perplexity:.3f} | {r.perplexity_ratio:.3f} |")
    lines += ["", "Full-cache task accuracy, strict protocol (questions and answers decoded one token at a time), "
              "per context length; last column: the mean when every answer is scored inside one teacher-forced "
              "forward over the whole sample (for top and middle targets the prompt's iteration, as in training):",
              "", "| model | " + " | ".join(f"{t} @{n}" for t in tasks for n in accuracy_contexts)
              + " | mean | mean, one forward |",
              "|---|" + "---|" * (len(tasks) * len(accuracy_contexts) + 2)]
    for r in rows:
        values = [r.accuracy[t][n] for t in tasks for n in accuracy_contexts]
        forward = [r.forward_accuracy[t][n] for t in tasks for n in accuracy_contexts]
        lines.append(f"| {r.name} | " + " | ".join(f"{v:.2f}" for v in values)
                     + f" | {sum(values) / len(values):.2f} | {sum(forward) / len(forward):.2f} |")
    lines += same_map_notes(rows)
    base = next(r for r in rows if r.name == "standard")
    lines += ["", "Absolute timings of the standard model: "
              + ", ".join(f"prefill {base.prefill_s[n]:.3f} s and decode {base.decode_tok_s[n]:.0f} tok/s at {n}"
                          for n in contexts) + f"; a training step {base.train_step_s:.2f} s. (Each model's training "
              "wall time is in the JSON, `train_wall_s`: the models trained two at a time beside other jobs, so those "
              "are not comparable.)", ""]
    return "\n".join(lines)


def same_map_notes(rows: list[StudyRow]) -> list[str]:
    """Lines naming the framework's configurations not in `rows` because their map is a row's map."""
    from offload.models.shared_kv import PARTITIONS, TARGETS, framework_map

    notes = []
    for layers, kv in sorted({(r.layers, r.kv_layers) for r in rows if r.configuration != "standard"}):
        for partition in PARTITIONS:
            for target in TARGETS:
                name = f"{partition}-{target}"
                try:
                    sources = framework_map(layers, partition, target, kv)
                except ValueError:
                    continue
                same = [r.name for r in rows if r.kv_source_layers == sources and r.layers == layers]
                if same and all(r.configuration != name or r.kv_layers != kv for r in rows):
                    notes.append(f"- {name} with {kv} KV layers has the map of {same[0]} "
                                 f"({'_'.join(map(str, sources))}): the same model, not trained twice.")
    return ["", *notes] if notes else []


def mean_accuracy(row: StudyRow) -> float:
    values = [a for per in row.accuracy.values() for a in per.values()]
    return sum(values) / len(values)


def plot(rows: list[StudyRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    markers = {"bottom": "o", "middle": "s", "top": "^", "standard": "*"}
    colors = {"standard": "black", "pizza": "tab:red", "sandwich": "tab:green", "lasagna": "tab:blue"}
    for r in rows:
        partition, _, target = r.configuration.partition("-")
        style = dict(marker=markers.get(target or "standard", "x"), color=colors.get(partition, "gray"),
                     linestyle="none", markersize=8)
        label = f"{r.name}"
        axes[0].plot(r.kv_reduction, r.perplexity_ratio, label=label, **style)
        axes[1].plot(r.kv_reduction, mean_accuracy(r), **style)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("perplexity / standard model (log)")
    axes[1].set_ylabel("mean task accuracy (5 tasks x contexts)")
    axes[1].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.set_xlabel("KV reduction (layers / KV layers)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("offload: cross-layer KV sharing configurations trained at small scale")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="offload bench crosslayer-study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, required=True,
                        help="folder of trained models, one subfolder each (standard, pizza-top, ..., pizza-top-kv2)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096], help="timed context lengths")
    parser.add_argument("--accuracy-contexts", type=int, nargs="+", default=[1024, 2048],
                        help="context lengths of the task accuracy")
    parser.add_argument("--samples", type=int, default=10, help="samples per task and context")
    parser.add_argument("--names", nargs="+", default=None, help="only these model folders (and standard)")
    parser.add_argument("--quality-only", action="store_true",
                        help="only score the models (kept in each folder for the full run), no tables")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model and context (medians)")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--windows", type=int, default=4, help="filler windows for perplexity")
    parser.add_argument("--window-tokens", type=int, default=1024)
    parser.add_argument("--scored", type=int, default=128, help="last tokens of each window scored")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 tokens, 2 samples, 1 repeat")
    parser.add_argument("--out", type=Path, default=Path("bench/results/crosslayer_study"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.contexts, args.samples, args.repeats, args.decode_steps = [512], 2, 1, 4
        args.accuracy_contexts = [512]
        args.windows, args.window_tokens, args.scored = 1, 256, 16
    meta = {"command": " ".join(["offload bench crosslayer-study", *(argv or [])]), "machine": machine(),
            "torch": torch.__version__, "samples": args.samples, "accuracy_contexts": args.accuracy_contexts,
            "repeats": args.repeats, "decode_steps": args.decode_steps, "windows": args.windows, "window_tokens": args.window_tokens,
            "scored": args.scored, "threads": args.threads}
    rows = run(args.models_dir, args.contexts, args.accuracy_contexts, args.samples, args.repeats, args.decode_steps,
               args.windows, args.window_tokens, args.scored, quality_only=args.quality_only, names=args.names)
    if args.quality_only:
        return
    meta["load_at_end"] = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]},
                                                        indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, meta))
    plot(rows, args.out.with_suffix(".png"))
    print(args.out.with_suffix(".md").read_text())
