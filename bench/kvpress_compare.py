"""NVIDIA kvpress presses on the embedded model, strict protocol: one table to compare with `offload bench policies`.

For every press x compression ratio x task x context length, each seeded sample
(`offload.models.embedded.task_samples(task, length, n, seed=1)`, the samples `offload bench
policies` uses) is scored as the project's `strict_predictions` scores a policy:

1. the context `input_ids[:context_end]` (never the question) is prefilled into a fresh
   `DynamicCache` inside `with press(model):`. kvpress registers a forward hook on every attention
   layer; in the prefill forward (`cache_position[-1] + 1 == q_len`) the hook calls
   `press.compress(...)` and replaces that layer's cached keys and values with the kept ones.
2. outside the context manager (no hook, so no compression) `input_ids[context_end:end]` are fed
   one decode step each (teacher forcing), with `position_ids` set to each token's true position,
   as kvpress's own pipeline does (`KVPressTextGenerationPipeline.generate_answer`): after
   compression the cache is shorter than the context, so the default position (the cache length)
   would be wrong. `end = max(b for answers)`: nothing after the last answer is fed.
3. an answer span (a, b) is right when argmax(logits at t - 1) == input_ids[t] for every t in
   [a, b); accuracy = right answers / answers (as `offload.models.embedded.task_accuracy`).

Replay (the default `--mode replay`): kvpress's hook runs after a layer's attention has been computed
over the full keys, so what reaches the next layer does not depend on the press; every layer's hook
gets the same arguments whatever the press. The context is therefore prefilled once per sample with
a recording hook, and for each press x ratio kvpress's unmodified `press.forward_hook` is called on
those recorded arguments (inside `with press(model)`, so the press's own setup runs). `--mode hooks`
runs a real prefill forward per press instead (kvpress's documented usage; one context forward per
press x ratio instead of one per sample);
`--check N` runs both for the first N samples of every cell and counts samples whose compressed
cache or predictions differ (expected: none).

After each prefill the per-layer cache key lengths are checked (a press that did not apply stops
the run instead of scoring a full cache) and recorded; each decode step must grow every layer by
exactly one token (no hook left behind). The full-cache rows are sanity checks: "full (forward)" is
one teacher-forced forward pass (the project's `_full_accuracy`), "full (strict)" is the decode
loop with no press (they must agree), and "full (strict, eager)" the same on the eager-attention
model that the presses needing attention weights run on.

Run from the repository root (kvpress 0.5.5 pins transformers<5.3, so it lives in its own venv;
the project is put on the path, not installed):

    python3.11 -m venv /tmp/kvpress-venv
    /tmp/kvpress-venv/bin/pip install torch==2.13.0
    /tmp/kvpress-venv/bin/pip install "transformers>=5.0,<5.3" kvpress==0.5.5 numpy numba psutil
    PYTHONPATH=. /tmp/kvpress-venv/bin/python bench/kvpress_compare.py --lengths 1024 2048 4096 --check 1 \\
        [--out bench/results/kvpress] [--presses ...] [--tasks ...] [--ratios 0.9 0.75 0.5] [--samples 20] \\
        [--mode replay|hooks] [--resume]

Writes `bench/results/kvpress.json` (meta, one record per press x ratio x task x length) and
`kvpress.md`. With the project's own venv (no kvpress needed),

    .venv/bin/python bench/kvpress_compare.py --compare bench/results/policies.json

writes `bench/results/kvpress_vs_offload.md`: each policy of `offload bench policies` beside the
press implementing the same method, on the same samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

FULL_FORWARD, FULL_STRICT = "full (forward)", "full (strict)"
TASKS = ("passkey", "vartrack", "aggregate", "mqar", "copy")
DEFAULT_PRESSES = ("StreamingLLMPress", "SnapKVPress", "PyramidKVPress", "TOVAPress", "ObservedAttentionPress",
                   "KnormPress", "ExpectedAttentionPress", "MergingPress(SnapKV)", "MergingPress(ObservedAttention)")
# kvpress presses left out, and why (written into results.md).
SKIPPED = {
    "CAMPress": "a DecodingPress (cache merging during decoding): its hook returns at once in the prefill and "
                "compresses only every `compression_interval` decode steps down to `target_size`. Under the strict "
                "protocol (press on the context prefill only) it would never compress; run during decoding it "
                "would score with the question tokens.",
}


def press_registry() -> dict:
    """name -> (factory(compression_ratio) -> press, attention implementation it needs, note). kvpress
    defaults throughout; built lazily so that `--help` works without kvpress."""
    import kvpress as kp

    return {
        "StreamingLLMPress": (lambda r: kp.StreamingLLMPress(compression_ratio=r), "sdpa",
                              "n_sink=4, the rest of the budget is the most recent context tokens; no key rerotation"),
        "SnapKVPress": (lambda r: kp.SnapKVPress(compression_ratio=r), "sdpa",
                        "window_size=64, kernel_size=5; the observation window is the last 64 context tokens (kept)"),
        "PyramidKVPress": (lambda r: kp.PyramidKVPress(compression_ratio=r), "sdpa",
                           "SnapKV scores, per-layer budgets (beta=20, window 64) with the same total; kvpress falls "
                           "back to SnapKV's uniform budget when the smallest layer budget would be under the window "
                           "(here: kept 10% and 25%)"),
        "TOVAPress": (lambda r: kp.TOVAPress(compression_ratio=r), "sdpa",
                      "attention of the last context token, averaged over all heads"),
        "ObservedAttentionPress": (lambda r: kp.ObservedAttentionPress(compression_ratio=r), "eager",
                                   "H2O-like: mean attention each key received over the whole prefill; needs eager "
                                   "attention (its docstring: Requires attn_implementation=\"eager\")"),
        "KnormPress": (lambda r: kp.KnormPress(compression_ratio=r), "sdpa", "keeps the keys of lowest L2 norm"),
        "ExpectedAttentionPress": (lambda r: kp.ExpectedAttentionPress(compression_ratio=r), "sdpa",
                                   "n_future_positions=512, n_sink=4, query covariance and value norms on"),
        "MergingPress(SnapKV)": (lambda r: kp.MergingPress(press=kp.SnapKVPress(compression_ratio=r)), "sdpa",
                                 "SnapKV selection; each evicted value folded into its most key-similar survivor "
                                 "(similarity_threshold=0, merge_fraction=1)"),
        "MergingPress(ObservedAttention)": (
            lambda r: kp.MergingPress(press=kp.ObservedAttentionPress(compression_ratio=r)), "eager",
            "D2O-like: ObservedAttention (H2O) selection plus MergingPress's merge-on-evict"),
    }


@dataclass
class Record:
    press: str
    compression_ratio: float  # kvpress's: 1 - kept fraction
    task: str
    length: int
    accuracy: float = 0.0  # right answers / answers
    answers: int = 0
    samples: int = 0
    top1_agreement: float = 1.0  # decode predictions equal to the full cache's (same true prefix)
    context_tokens_mean: float = 0.0  # tokens prefilled (context_end), mean over samples
    kept_tokens_mean: float = 0.0  # cache key length right after the prefill, mean over layers and samples
    kept_fraction: float = 1.0  # kept_tokens_mean / context_tokens_mean
    kept_per_layer_first: list[int] = field(default_factory=list)  # the first sample's per-layer key lengths
    seconds: float = 0.0
    attn_implementation: str = "sdpa"
    mode: str = "replay"  # replay: a recorded prefill, press hooks replayed; hooks: a prefill forward per press
    checked: int = 0  # samples also run through the real `with press(model)` forward (--check)
    check_mismatches: int = 0  # of those, samples whose compressed cache or predictions differed


# ---------------------------------------------------------------------------------------------------------------
# Prefill, press, decode


def _attention_layers(model):
    return [layer.self_attn for layer in model.model.layers]


def _cache_lengths(cache) -> list[int]:
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


@torch.inference_mode()
def prefill_with_press(model, context_ids: torch.Tensor, press=None):
    """kvpress's own usage: the context forward inside `with press(model):` on a fresh DynamicCache.
    Returns (cache, logits at the last context position)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model) if press is not None else nullcontext():
        logits = model(input_ids=context_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return cache, logits[0, -1]


@dataclass
class Prefill:
    """One uncompressed context prefill, recorded for `replay_press`."""

    logits: torch.Tensor  # [vocab] at the last context position
    calls: dict  # layer_idx -> (kwargs, output) that the attention layer's forward hooks received
    kv: dict  # layer_idx -> (keys, values) of the full cache after the prefill


@torch.inference_mode()
def record_prefill(model, context_ids: torch.Tensor) -> Prefill:
    from transformers import DynamicCache

    calls = {}

    def hook(module, args, kwargs, output):
        calls[module.layer_idx] = (dict(kwargs), output)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in _attention_layers(model)]
    cache = DynamicCache()
    try:
        logits = model(input_ids=context_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    finally:
        for h in handles:
            h.remove()
    kv = {i: (layer.keys, layer.values) for i, layer in enumerate(cache.layers)}
    return Prefill(logits[0, -1], calls, kv)


@torch.inference_mode()
def replay_press(model, prefill: Prefill, press):
    """The cache `prefill_with_press(model, context, press)` leaves, without a new forward pass.

    kvpress's `BasePress.forward_hook` runs after each attention layer's forward: the layer has
    attended over its full keys, then the hook shrinks its cache layer. The next layer receives the
    attention output computed before the compression, so every layer's hook gets the same (kwargs,
    output) whatever the press. Here, inside `with press(model)` (the press's own setup:
    post_init_from_model, rotary_emb), each recorded call is passed to kvpress's unmodified
    `press.forward_hook`, layer by layer, on a fresh cache holding that layer's full keys and values."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model):
        for module in _attention_layers(model):
            i = module.layer_idx
            kwargs, output = prefill.calls[i]
            keys, values = prefill.kv[i]
            cache.update(keys.clone(), values.clone(), i)
            press.forward_hook(module, (), {**kwargs, "past_key_values": cache}, output)
    return cache


def full_cache(prefill: Prefill):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (keys, values) in sorted(prefill.kv.items()):
        cache.update(keys.clone(), values.clone(), i)
    return cache


@torch.inference_mode()
def decode(model, cache, ids: torch.Tensor, start: int, first_logits: torch.Tensor) -> torch.Tensor:
    """Teacher-forced decode steps for ids[:, start:-1] at their true positions, no press. Returns the
    argmax predictions for positions start..T-1 [T - start]; `first_logits` predicts position `start`."""
    predicted = [int(first_logits.argmax())]
    for t in range(start, ids.shape[1] - 1):
        before = _cache_lengths(cache)
        logits = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True,
                       position_ids=torch.tensor([[t]])).logits
        if _cache_lengths(cache) != [n + 1 for n in before]:  # a hook left behind would compress here
            raise RuntimeError(f"the cache did not grow by one token at step {t}: {before} -> {_cache_lengths(cache)}")
        predicted.append(int(logits[0, -1].argmax()))
    return torch.tensor(predicted)


def compressed(model, ids: torch.Tensor, start: int, press, prefill: Prefill | None):
    """(cache after the press, logits at the last context position): replayed from `prefill` when
    given, else a real prefill forward with the press's hooks."""
    if prefill is not None:
        return replay_press(model, prefill, press), prefill.logits
    return prefill_with_press(model, ids[:, :start], press)


# ---------------------------------------------------------------------------------------------------------------
# Cells


def _window(sample) -> torch.Tensor:
    end = max(b for _, _, b in sample.answers)
    return torch.from_numpy(sample.input_ids[None, :end].copy())


def _answers_right(sample, predicted: torch.Tensor) -> tuple[int, int]:
    start = sample.context_end
    right = sum(bool((predicted[a - start:b - start] == torch.from_numpy(sample.input_ids[a:b])).all())
                for _, a, b in sample.answers)
    return right, len(sample.answers)


class Cell:
    """Accumulates one press x ratio x task x length over samples."""

    def __init__(self, record: Record):
        self.record, self.right, self.total, self.agree, self.steps = record, 0, 0, 0, 0
        self.kept, self.context = [], []

    def add(self, sample, predicted, kept, full_predicted, seconds):
        right, total = _answers_right(sample, predicted)
        self.right, self.total = self.right + right, self.total + total
        self.agree += int((predicted == full_predicted).sum())
        self.steps += len(predicted)
        self.kept.append(kept)
        self.context.append(sample.context_end)
        self.record.seconds += seconds

    def finish(self) -> Record:
        r = self.record
        r.samples, r.answers = len(self.context), self.total
        r.accuracy = self.right / max(1, self.total)
        r.top1_agreement = self.agree / max(1, self.steps)
        r.context_tokens_mean = float(np.mean(self.context))
        r.kept_tokens_mean = float(np.mean([np.mean(k) for k in self.kept]))
        r.kept_fraction = r.kept_tokens_mean / r.context_tokens_mean
        r.kept_per_layer_first = self.kept[0]
        return r


def run_task_length(models, samples, task: str, length: int, todo: list[tuple[str, float]], registry,
                    mode: str, check: int, log=print) -> list[Record]:
    """The full-cache rows and every (press, ratio) in `todo` for one task x length, sample by sample
    (one recorded prefill at a time: eager attention weights of a 4k context are ~2 GB)."""
    started = time.perf_counter()
    right = total = 0
    for sample in samples:  # the project's _full_accuracy: one teacher-forced forward pass
        ids = torch.from_numpy(sample.input_ids[None].copy())
        with torch.inference_mode():
            pred = models["sdpa"](input_ids=ids).logits[0].argmax(-1)
        for _, a, b in sample.answers:
            right += bool((pred[a - 1:b - 1] == ids[0, a:b]).all())
            total += 1
    ctx = float(np.mean([s.context_end for s in samples]))
    forward = Record(FULL_FORWARD, 0.0, task, length, right / max(1, total), total, len(samples), 1.0, ctx, ctx, 1.0,
                     [], time.perf_counter() - started, mode="forward")
    attns = ["sdpa"] + sorted({registry[name][1] for name, _ in todo} - {"sdpa"})
    # The decode loop with no press, once per attention implementation a press runs on (top-1 of a
    # press is measured against the full cache of its own implementation; the eager row's against sdpa).
    strict = {attn: Cell(Record(FULL_STRICT if attn == "sdpa" else f"{FULL_STRICT[:-1]}, {attn})", 0.0, task, length,
                                attn_implementation=attn, mode=mode)) for attn in attns}
    cells = {(name, ratio): Cell(Record(name, ratio, task, length, attn_implementation=registry[name][1], mode=mode))
             for name, ratio in todo}
    for n, sample in enumerate(samples):
        ids, start = _window(sample), sample.context_end
        sdpa_predicted = None
        for attn in attns:
            model = models[attn]
            t0 = time.perf_counter()
            prefill = record_prefill(model, ids[:, :start]) if mode == "replay" else None
            prefill_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            cache, first = (full_cache(prefill), prefill.logits) if prefill else prefill_with_press(model, ids[:, :start])
            kept = _cache_lengths(cache)
            full_predicted = decode(model, cache, ids, start, first)
            if attn == "sdpa":
                sdpa_predicted = full_predicted
            strict[attn].add(sample, full_predicted, kept, sdpa_predicted, time.perf_counter() - t0 + prefill_seconds)
            mine = [(k, c) for k, c in cells.items() if registry[k[0]][1] == attn]
            for (name, ratio), cell in mine:
                factory = registry[name][0]
                t0 = time.perf_counter()
                cache, first = compressed(model, ids, start, factory(ratio), prefill)
                kept = _cache_lengths(cache)
                if max(kept) >= start:  # the hook never compressed: do not score a full cache as the press's
                    raise RuntimeError(f"{name} at ratio {ratio}: cache lengths {kept} after a {start}-token prefill; "
                                       "the press did not apply")
                snapshot = [(layer.keys, layer.values) for layer in cache.layers] if n < check else None
                predicted = decode(model, cache, ids, start, first)
                # The shared prefill's time is split over the cells that used it.
                cell.add(sample, predicted, kept, full_predicted,
                         time.perf_counter() - t0 + prefill_seconds / max(1, len(mine)))
                if n < check:
                    real_cache, real_first = prefill_with_press(model, ids[:, :start], factory(ratio))
                    same_cache = all(torch.equal(a, x.keys) and torch.equal(b, x.values)
                                     for (a, b), x in zip(snapshot, real_cache.layers)) and \
                        [k.shape[-2] for k, _ in snapshot] == _cache_lengths(real_cache)
                    real_predicted = decode(model, real_cache, ids, start, real_first)
                    cell.record.checked += 1
                    if not (same_cache and torch.equal(real_predicted, predicted)):
                        cell.record.check_mismatches += 1
                        log(f"  CHECK MISMATCH {name} {ratio} sample {n}: cache equal {same_cache}, "
                            f"predictions equal {torch.equal(real_predicted, predicted)}")
            del prefill
    records = [forward] + [c.finish() for c in strict.values()] + [c.finish() for c in cells.values()]
    if records[0].accuracy != records[1].accuracy:
        log(f"WARNING {task}@{length}: full forward {records[0].accuracy:.3f} != full strict {records[1].accuracy:.3f}")
    return records


# ---------------------------------------------------------------------------------------------------------------
# Output


def _key(r: Record):
    return r.press, float(r.compression_ratio), r.task, int(r.length)


def markdown(meta: dict, records: list[Record]) -> str:
    cols = [(t, n) for n in sorted({r.length for r in records}) for t in meta["tasks"]
            if any(r.task == t and r.length == n for r in records)]
    by = {_key(r): r for r in records}
    checked = sum(r.checked for r in records)
    mismatches = sum(r.check_mismatches for r in records)
    lines = [f"# kvpress {meta['kvpress']} presses on the embedded model, strict protocol", "",
             f"Command: `{meta['command']}`", "",
             f"{meta['samples']} samples per cell (`task_samples(task, length, n, seed={meta['seed']})`); kvpress "
             f"{meta['kvpress']}, transformers {meta['transformers']}, torch {meta['torch']}; {meta['machine']}.", "",
             "Accuracy = exact match of whole answers (right answers / answers). The context (`input_ids[:context_end]`)"
             " is prefilled with the press active, then the questions and answers are fed one decode step at a time "
             "(teacher forcing, true positions, no press). kept = cache key length after the prefill over the "
             "context length (mean over layers, samples and the row's cells). top-1 = decode steps whose argmax "
             "equals the full cache's (same true prefix; a press is compared with the full cache of its own attention "
             "implementation, the eager full-cache row with sdpa's). Presses run with kvpress defaults; "
             "`full (forward)` is one teacher-forced forward pass, `full (strict)` the same decode loop without a "
             "press: they must agree.", ""]
    if checked:
        lines += [f"Replay check: {checked} sample-cells also run through the real `with press(model)` forward, "
                  f"{mismatches} differed in cache or predictions.", ""]
    header = "| press | kept % | " + " | ".join(f"{t}@{n}" for t, n in cols) + " | kept | top-1 |"
    ratios = sorted({r.compression_ratio for r in records if r.compression_ratio > 0}, reverse=True)
    for ratio in [None] + ratios:
        names = sorted({r.press for r in records if r.compression_ratio == 0.0}, key=lambda p: (p != FULL_FORWARD, p)) \
            if ratio is None else meta["presses"]
        title = "Full cache (sanity)" if ratio is None else f"Kept {100 * (1 - ratio):g}% (compression_ratio {ratio:g})"
        lines += [f"## {title}", "", header, "|" + "---|" * (header.count("|") - 1)]
        for name in names:
            cells = [by.get((name, 0.0 if ratio is None else ratio, t, n)) for t, n in cols]
            present = [c for c in cells if c is not None]
            if not present:
                continue
            kept = np.mean([c.kept_fraction for c in present])
            top1 = np.mean([c.top1_agreement for c in present])
            pct = 100 if ratio is None else round(100 * (1 - ratio))
            lines.append(f"| {name} | {pct} | " + " | ".join(f"{c.accuracy:.2f}" if c else "-" for c in cells)
                         + f" | {kept:.3f} | {top1:.3f} |")
        lines.append("")
    notes = meta.get("press_notes", {})
    lines += ["## Presses (kvpress defaults)", ""]
    lines += [f"- {n} ({meta['attn'].get(n, 'sdpa')} attention): {notes[n]}" for n in meta["presses"] if n in notes]
    lines += ["", "## Not run", ""] + [f"- {k}: {v}" for k, v in meta["skipped"].items()] + [""]
    lines += [f"Total time in cells: {sum(r.seconds for r in records) / 60:.1f} min.", ""]
    return "\n".join(lines)


def write(out: Path, meta: dict, records: list[Record]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": [asdict(r) for r in records]}, indent=1)
                                        + "\n")
    out.with_suffix(".md").write_text(markdown(meta, records))


# offload policy -> the kvpress press implementing the same method (D2O and KVMerger both select as
# H2O and merge what leaves: kvpress's MergingPress over its H2O-like ObservedAttentionPress).
SAME_METHOD = {"streaming": "StreamingLLMPress", "snapkv": "SnapKVPress", "pyramidkv": "PyramidKVPress",
               "tova": "TOVAPress", "h2o": "ObservedAttentionPress", "kvmerger": "MergingPress(ObservedAttention)",
               "d2o": "MergingPress(ObservedAttention)"}


def compare(policies_json: Path, kvpress_json: Path, length: int = 4096) -> str:
    """Markdown: at `length`, each policy (effect demote, and drop where run) beside its kvpress press,
    accuracy per task; then the best press against quest, sparq and the oracle."""
    ours = json.loads(policies_json.read_text())
    theirs = json.loads(kvpress_json.read_text())
    tasks = [t for t in theirs["meta"]["tasks"] if t in ours["meta"]["tasks"]]
    acc = {(c["policy"], c["effect"], c["budget_pct"], c["task"], c["length"]): c["accuracy"] for c in ours["cells"]}
    press = {(r["press"], round(100 * (1 - r["compression_ratio"])), r["task"], r["length"]): r["accuracy"]
             for r in theirs["records"]}
    budgets = sorted({round(100 * (1 - r["compression_ratio"])) for r in theirs["records"] if r["compression_ratio"]})

    def cell(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [f"# offload policies beside kvpress presses ({length} tokens, strict protocol, same samples)", "",
             f"offload: `{policies_json}` (`{ours['meta']['command'][:80]}...`); kvpress {theirs['meta']['kvpress']}: "
             f"`{kvpress_json}`. Each cell: offload demote / offload drop / kvpress (drop was run at 10% only). "
             "A kvpress press compresses the context once, at prefill; an offload policy chooses at every decode step.",
             "", "| method | kept | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 2)]
    for policy, name in SAME_METHOD.items():
        for pct in budgets:
            row = [f"{cell(acc.get((policy, 'demote', float(pct), t, length)))} / "
                   f"{cell(acc.get((policy, 'drop', float(pct), t, length)))} / "
                   f"{cell(press.get((name, pct, t, length)))}" for t in tasks]
            lines.append(f"| {policy} : {name} | {pct}% | " + " | ".join(row) + " |")
    lines += ["", "Query-aware policies (no kvpress press) against the best press of each cell:", "",
              "| kept | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    presses = sorted({r["press"] for r in theirs["records"] if r["compression_ratio"]})
    for pct in budgets:
        row = []
        for t in tasks:
            best = max(presses, key=lambda p: press.get((p, pct, t, length), -1.0))
            row.append(f"quest {cell(acc.get(('quest', 'demote', float(pct), t, length)))}, sparq "
                       f"{cell(acc.get(('sparq', 'demote', float(pct), t, length)))}, oracle "
                       f"{cell(acc.get(('oracle', 'demote', float(pct), t, length)))}; best press "
                       f"{cell(press.get((best, pct, t, length)))} ({best})")
        lines.append(f"| {pct}% | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presses", nargs="+", default=list(DEFAULT_PRESSES))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.9, 0.75, 0.5],
                        help="kvpress compression_ratio = 1 - kept fraction")
    parser.add_argument("--samples", type=int, default=20, help="samples per cell")
    parser.add_argument("--seed", type=int, default=1, help="task_samples seed (offload bench policies uses 1)")
    parser.add_argument("--mode", choices=("replay", "hooks"), default="replay",
                        help="replay: one recorded prefill per sample, kvpress's hook replayed per press (default); "
                             "hooks: a real prefill forward per press")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="also run the first N samples of every cell through the real forward and compare")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--resume", action="store_true", help="keep the records in --out's JSON, run the rest")
    parser.add_argument("--out", type=Path, default=Path("bench/results/kvpress"),
                        help="writes OUT.json and OUT.md")
    parser.add_argument("--compare", type=Path, default=None, metavar="POLICIES_JSON",
                        help="write --out's sibling kvpress_vs_offload.md from POLICIES_JSON and --out's JSON, then exit")
    args = parser.parse_args(argv)
    if args.compare is not None:
        lengths = sorted({r["length"] for r in json.loads(args.out.with_suffix(".json").read_text())["records"]},
                         reverse=True)
        tables = "\n".join(compare(args.compare, args.out.with_suffix(".json"), n) for n in lengths)
        (args.out.parent / "kvpress_vs_offload.md").write_text(tables)
        print(tables)
        return

    import transformers

    from offload.models.embedded import load_embedded_model, task_samples

    registry = press_registry()
    unknown = [p for p in args.presses if p not in registry]
    if unknown:
        parser.error(f"unknown presses {unknown}; known: {sorted(registry)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = "PYTHONPATH=/work/main python kvpress_compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": command.strip(), "kvpress": _version("kvpress"), "transformers": transformers.__version__,
            "torch": torch.__version__, "samples": args.samples, "seed": args.seed, "mode": args.mode,
            "presses": args.presses, "tasks": args.tasks,
            "machine": f"{os.cpu_count()} cores ({args.threads} torch threads), {platform.machine()}, "
                       f"load {os.getloadavg()[0]:.1f} at the start",
            "attn": {p: registry[p][1] for p in args.presses}, "press_notes": {p: registry[p][2] for p in args.presses},
            "skipped": SKIPPED}
    records: list[Record] = []
    results = args.out.with_suffix(".json")
    if args.resume and results.exists():
        old = json.loads(results.read_text())
        if old["meta"]["samples"] != args.samples:
            parser.error(f"{results} has {old['meta']['samples']} samples per cell, not {args.samples}")
        records = [Record(**r) for r in old["records"]]
        meta["presses"] = list(dict.fromkeys(old["meta"]["presses"] + args.presses))
        meta["tasks"] = list(dict.fromkeys(old["meta"]["tasks"] + args.tasks))
        meta["attn"] = {**old["meta"]["attn"], **meta["attn"]}
        meta["press_notes"] = {**old["meta"]["press_notes"], **meta["press_notes"]}
        meta["command"] = old["meta"]["command"] + " ; then " + meta["command"]
        meta["machine"] = old["meta"]["machine"] + "; then " + meta["machine"]
    done = {_key(r) for r in records}

    models = {}
    for attn in {"sdpa"} | {registry[p][1] for p in args.presses}:
        model, _ = load_embedded_model()
        if model.config._attn_implementation != attn:
            model.set_attn_implementation(attn)
        models[attn] = model

    for length in args.lengths:
        for task in args.tasks:
            todo = [(p, r) for p in args.presses for r in args.ratios if (p, r, task, length) not in done]
            if not todo:
                continue
            samples = task_samples(task, length, args.samples, seed=args.seed)
            new = run_task_length(models, samples, task, length, todo, registry, args.mode, args.check)
            replaced = {_key(r) for r in new}
            records = [r for r in records if _key(r) not in replaced] + new
            print(f"{task}@{length}: full forward {new[0].accuracy:.2f}, full strict {new[1].accuracy:.2f}", flush=True)
            for r in new[2:]:
                print(f"  {r.press:32s} ratio {r.compression_ratio:<5g} acc {r.accuracy:.2f} top1 "
                      f"{r.top1_agreement:.3f} kept {r.kept_fraction:.3f} {r.kept_per_layer_first} "
                      f"{r.seconds:.1f}s" + (f" check {r.checked - r.check_mismatches}/{r.checked}" if r.checked else ""),
                      flush=True)
            write(args.out, meta, records)  # partial results survive an interrupted run
    write(args.out, meta, records)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
