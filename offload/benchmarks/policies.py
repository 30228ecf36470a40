"""`offload bench policies`: every KV policy x token budget x task x context length on one table.

The strict protocol (kvpress's): the context is prefilled, then the questions and answers are
fed one decode step at a time, so every answer token depends on what the policy kept. The
lenient number (questions prefilled with the context, exactly) can be added with `--lenient`.

Per cell: task accuracy (exact match of whole answers), top-1 agreement with the full cache
(same true prefix, argmax equal), selection recall against the oracle (share of the oracle's top
pages, same budget, per KV head, that the policy kept), attention mass captured (exact mass on
the kept pages), bytes moved per decode step, and with effect="drop" the share of KV bytes kept.
The full cache and the oracle are rows of the same table. Perplexity on a real model's text
(stories260K on Grimm's tales by default, when present) gives the ratio to the full cache.

    offload bench policies                 # the full grid (hours on 2 cores)
    offload bench policies --quick         # a smoke run: 2 policies, 1 budget, 1 length, 2 samples
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from offload import OffloadedModel
from offload.benchmarks import machine
from offload.policies import POLICIES

DEFAULT_BUDGETS = (5.0, 10.0, 25.0, 50.0)
DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_POLICIES = ("oracle", "quest", "sparq", "tova", "h2o", "kvmerger", "d2o", "snapkv", "pyramidkv", "fastgen",
                    "streaming", "window")
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
# What selection recall is measured against (`offload.store.selection.measure_choice`). Cells of
# earlier runs, measured against each head's top-mass pages alone, load as "top mass" and are
# marked in the tables.
RECALL_RULE = "sinks + recent, then top mass"
OLD_RECALL_RULE = "top mass"


@dataclass
class Cell:
    policy: str
    effect: str
    budget_pct: float
    task: str
    length: int
    accuracy: float = 0.0
    lenient_accuracy: float | None = None
    top1_agreement: float = 0.0
    oracle_recall: float = 1.0
    mass_captured: float = 1.0
    moved_bytes_per_step: float = 0.0
    kv_kept: float = 1.0  # share of the KV bytes still held at the end (effect="drop")
    samples: int = 0
    seconds: float = 0.0
    recall_rule: str = OLD_RECALL_RULE  # (absent from earlier runs' JSON)


@dataclass
class Perplexity:
    policy: str
    budget_pct: float
    perplexity: float
    ratio: float
    top1_agreement: float


@dataclass
class Results:
    meta: dict
    full_cache: dict = field(default_factory=dict)  # task -> length -> accuracy
    cells: list[Cell] = field(default_factory=list)
    perplexity: list[Perplexity] = field(default_factory=list)


@torch.inference_mode()
def strict_predictions(om: OffloadedModel, ids: torch.Tensor, start: int, measure: bool = False):
    """Prefill ids[:, :start], then feed ids[start:] one decode step each. Returns (argmax
    predictions for positions start..T-1 [T - start], mean NLL of those tokens, the cache's stats).
    `measure`: compare each choice with exact attention (oracle recall, mass captured; slower)."""
    cache = om.new_cache(1, ids.shape[1])
    cache.store.measure = measure
    try:
        logits = om(ids[:, :start], past_key_values=cache).logits[:, -1]
        predicted, nll = [], 0.0
        for t in range(start, ids.shape[1]):
            nll += float(torch.nn.functional.cross_entropy(logits.float(), ids[:, t]))
            predicted.append(int(logits.argmax(-1)))
            if t + 1 < ids.shape[1]:
                logits = om(ids[:, t : t + 1], past_key_values=cache).logits[:, -1]
        stats = cache.stats()
    finally:
        cache.release()
    return torch.tensor(predicted), nll / (ids.shape[1] - start), stats


def _config(policy: str, effect: str, budget_tokens: int) -> dict:
    # Sinks and recent window small enough for a 5% budget of 1k tokens (quest and streaming keep them).
    return dict(mode="sparse", policy=policy, policy_effect=effect, token_budget=max(1, budget_tokens),
                prefix_cache=False, prefetch=False, sink_tokens=16, recent_tokens=32)


def _wrap(model, policy: str, effect: str, budget_tokens: int, max_tokens: int) -> OffloadedModel:
    """The wrapper of one cell. Its device holds the sinks, the recent window and the tail plus as many
    pages as the token budget (a real offload setting: what the policy picks beyond those must move)."""
    from offload.hf.layers import layout_from_model_config

    om = OffloadedModel(model, **_config(policy, effect, budget_tokens))
    layout = layout_from_model_config(model.config, om.config.page_size, torch.float32)
    budget_pages = -(-max(1, budget_tokens) // layout.page_size)
    om.config.device_budget = (om.minimum_device_budget(1, max_tokens)
                               + layout.num_layers * budget_pages * layout.page_bytes)
    return om


def run_task_cell(model, samples, policy: str, effect: str, budget_pct: float, task: str, length: int,
                  full_preds: list[torch.Tensor], lenient: bool) -> Cell:
    cell = Cell(policy, effect, budget_pct, task, length, samples=len(samples), recall_rule=RECALL_RULE)
    started = time.perf_counter()
    with _wrap(model, policy, effect, round(length * budget_pct / 100), length) as om:
        right = total = agree = steps = lenient_right = 0
        moved = hits = oracle = missed = rows = 0.0
        kept = 0.0
        for sample, full in zip(samples, full_preds):
            end = max(b for _, _, b in sample.answers)
            ids = torch.from_numpy(sample.input_ids[None, :end].copy())
            start = sample.context_end
            predicted, _, stats = strict_predictions(om, ids, start, measure=True)
            for _, a, b in sample.answers:
                right += bool((predicted[a - start : b - start] == ids[0, a:b]).all())
                total += 1
            agree += int((predicted == full[start - 1 : end - 1]).sum())
            steps += end - start
            moved += stats.h2d_bytes + stats.gathered_bytes + stats.policy_read_bytes
            hits, oracle = hits + stats.oracle_hits, oracle + stats.oracle_pages
            missed, rows = missed + stats.mass_missed, rows + stats.mass_measured_rows
            kept += stats.kv_bytes / max(1, stats.kv_bytes + stats.dropped_bytes)
            if lenient:
                first = min(a for _, a, _ in sample.answers)
                predicted, _, _ = strict_predictions(om, ids, first)
                for _, a, b in sample.answers:
                    lenient_right += bool((predicted[a - first : b - first] == ids[0, a:b]).all())
    cell.accuracy = right / max(1, total)
    cell.lenient_accuracy = lenient_right / max(1, total) if lenient else None
    cell.top1_agreement = agree / max(1, steps)
    cell.oracle_recall = hits / oracle if oracle else 1.0
    cell.mass_captured = 1.0 - missed / rows if rows else 1.0
    cell.moved_bytes_per_step = moved / max(1, steps - len(samples))
    cell.kv_kept = kept / max(1, len(samples))
    cell.seconds = time.perf_counter() - started
    return cell


def _full_predictions(model, samples) -> list[torch.Tensor]:
    out = []
    with torch.inference_mode():
        for sample in samples:
            ids = torch.from_numpy(sample.input_ids[None].copy())
            out.append(model(ids, attention_mask=torch.ones_like(ids)).logits[0].argmax(-1))
    return out


def _full_accuracy(samples, full_preds) -> float:
    right = total = 0
    for sample, pred in zip(samples, full_preds):
        ids = torch.from_numpy(sample.input_ids)
        for _, a, b in sample.answers:
            right += bool((pred[a - 1 : b - 1] == ids[a:b]).all())
            total += 1
    return right / max(1, total)


def perplexity_rows(model_path: Path, text_path: Path, context: int, eval_tokens: int, policies, budgets,
                    progress) -> list[Perplexity]:
    """Perplexity of the last `eval_tokens` of `context` tokens of text, strict (decode steps)."""
    from offload.models import load_llama2c

    bins = [model_path] if model_path.suffix == ".bin" else sorted(
        p for p in model_path.glob("*.bin") if not p.name.startswith("tok"))
    model, tokenizer = load_llama2c(bins[0])
    ids = torch.tensor([tokenizer.encode(text_path.read_text(encoding="utf-8", errors="replace"))[:context]])
    start = context - eval_tokens
    with torch.inference_mode():
        logits = model(ids).logits[0, start - 1 : -1].float()
    full_ppl = math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, start:])))
    full_pred = logits.argmax(-1)
    rows = [Perplexity("full cache", 100.0, full_ppl, 1.0, 1.0)]
    for policy in policies:
        for pct in budgets:
            with _wrap(model, policy, "demote", round(context * pct / 100), context) as om:
                predicted, nll, _ = strict_predictions(om, ids, start)
            ppl = math.exp(nll)
            rows.append(Perplexity(policy, pct, ppl, ppl / full_ppl, float((predicted == full_pred).float().mean())))
            progress.update(1)
    return rows


def load(path: Path, meta: dict, keep_meta: bool = False) -> Results:
    """Results from an earlier run's JSON (to resume it); `meta` replaces its meta, keeping its
    command (with `keep_meta`, its own meta is kept whole)."""
    data = json.loads(path.read_text())
    if data["meta"].get("samples") != meta["samples"]:
        raise SystemExit(f"{path} has {data['meta'].get('samples')} samples per cell, not {meta['samples']} (--samples)")
    if keep_meta:
        meta = data["meta"]
    meta = {**meta, "command": data["meta"]["command"] + ("" if keep_meta else " ; then " + meta["command"]),
            "policies": list(dict.fromkeys(data["meta"]["policies"] + meta["policies"])),
            "tasks": list(dict.fromkeys(data["meta"]["tasks"] + meta["tasks"]))}
    results = Results(meta)
    results.full_cache = {task: {int(n): acc for n, acc in by_length.items()} for task, by_length in data["full_cache"].items()}
    results.cells = [Cell(**c) for c in data["cells"]]
    results.perplexity = [Perplexity(**p) for p in data["perplexity"]]
    return results


def combine(into: Results, other: Results) -> None:
    """Cells and perplexity rows of `other` replace those of `into` with the same key, or join them."""
    key = lambda c: (c.policy, c.effect, c.budget_pct, c.task, c.length)  # noqa: E731
    replaced = {key(c) for c in other.cells}
    into.cells = [c for c in into.cells if key(c) not in replaced] + other.cells
    rows = {(p.policy, p.budget_pct) for p in other.perplexity if p.policy != "full cache"}
    into.perplexity = [p for p in into.perplexity if (p.policy, p.budget_pct) not in rows] + \
        [p for p in other.perplexity if p.policy != "full cache"]
    for task, by_length in other.full_cache.items():
        into.full_cache.setdefault(task, {}).update(by_length)
    meta = into.meta
    meta["command"] += " ; " + other.meta["command"] + " ; merged by --merge-from"
    meta["policies"] = list(dict.fromkeys(meta["policies"] + other.meta["policies"]))
    meta["tasks"] = list(dict.fromkeys(meta["tasks"] + other.meta["tasks"]))
    meta["machine"] += f"; {other.meta['machine']}"


def write(results: Results, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": results.meta, "full_cache": results.full_cache, "cells": [asdict(c) for c in results.cells],
            "perplexity": [asdict(p) for p in results.perplexity]}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    _plot(results, out)


def markdown(results: Results) -> str:
    meta = results.meta
    lines = [f"# KV policies, strict protocol ({meta['model']})", "",
             f"Command: `{meta['command']}`. {meta['samples']} samples per cell; machine: {meta['machine']}.", "",
             "Accuracy = exact match of whole answers, the context prefilled and the questions and answers fed as "
             "decode steps through the policy. recall = share of the oracle's top pages (same budget, per KV head) "
             "kept; mass = exact attention mass on the kept pages (both for effect demote only: after drops, exact "
             "attention is over what is left); moved = bytes per decode step brought to the "
             "device part or read to choose pages; kept = KV bytes still held (effect drop).", ""]
    if _old_rule_mark(results.cells):
        lines += [f"† recall measured by an earlier run against each head's top-mass pages alone; unmarked recall is "
                  f"against the oracle's current rule ({RECALL_RULE}: the pages the `oracle` policy keeps).", ""]
    tasks = sorted({c.task for c in results.cells}, key=meta["tasks"].index)
    lengths = sorted({c.length for c in results.cells})
    for task in tasks:
        lines += [f"## {task}", ""]
        header = "| policy | effect | budget | " + " | ".join(f"{n} acc" for n in lengths) + \
                 " | top-1 | recall | mass | moved/step | kept |"
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        full = results.full_cache.get(task, {})
        lines.append("| full cache | - | 100% | " + " | ".join(f"{full.get(str(n), full.get(n, 0)):.2f}" for n in lengths)
                     + " | 1.000 | 1.000 | 1.000 | 0 | 1.00 |")
        keys = sorted({(c.policy, c.effect, c.budget_pct) for c in results.cells if c.task == task},
                      key=lambda k: (k[2], meta["policies"].index(k[0]), k[1]))
        for policy, effect, pct in keys:
            cells = [c for c in results.cells if (c.task, c.policy, c.effect, c.budget_pct) == (task, policy, effect, pct)]
            by_length = {c.length: c for c in cells}
            n = len(cells)
            lines.append(
                f"| {policy} | {effect} | {pct:g}% | "
                + " | ".join(f"{by_length[k].accuracy:.2f}" if k in by_length else "-" for k in lengths)
                + f" | {sum(c.top1_agreement for c in cells) / n:.3f} | "
                + (f"{sum(c.oracle_recall for c in cells) / n:.3f}{_old_rule_mark(cells)} | "
                   f"{sum(c.mass_captured for c in cells) / n:.3f}"
                   if effect == "demote" else "- | -")  # after drops, the oracle sees only what is left
                + f" | {_kib(sum(c.moved_bytes_per_step for c in cells) / n)}"
                f" | {sum(c.kv_kept for c in cells) / n:.2f} |")
        lines.append("")
    lines += ["## The oracle as a bound", "", oracle_bound_note(results), ""]
    if results.perplexity:
        lines += ["## Perplexity (stories260K, Grimm's tales)", "",
                  f"{meta.get('ppl_context')} tokens of text, the last {meta.get('ppl_eval')} scored as decode steps.", "",
                  "| policy | budget | perplexity | ratio to full | top-1 |", "|---|---|---|---|---|"]
        for p in results.perplexity:
            lines.append(f"| {p.policy} | {p.budget_pct:g}% | {p.perplexity:.3f} | {p.ratio:.3f} | {p.top1_agreement:.3f} |")
        lines.append("")
    return "\n".join(lines)


def summary_table(results: Results, length: int = 4096, budgets=(10.0, 25.0)) -> str:
    """The README's table: accuracy per task at one context length and two budgets (effect demote),
    and the mean selection recall and mass captured over that length's cells."""
    tasks = [t for t in results.meta["tasks"] if any(c.task == t and c.length == length for c in results.cells)]
    header = "| policy | " + " | ".join(f"{t} {b:g}%" for t in tasks for b in budgets) + " | recall | mass |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    full = [f"{results.full_cache[t][length]:.2f}" for t in tasks for _ in budgets]
    lines.append("| full cache | " + " | ".join(full) + " | 1.00 | 1.00 |")
    for policy in results.meta["policies"]:
        cells = [c for c in results.cells if c.policy == policy and c.effect == "demote" and c.length == length]
        if not cells:
            continue
        acc = {(c.task, c.budget_pct): c.accuracy for c in cells}
        row = [f"{acc[(t, b)]:.2f}" if (t, b) in acc else "-" for t in tasks for b in budgets]
        picked = [c for c in cells if c.budget_pct in budgets]
        recall = sum(c.oracle_recall for c in picked) / max(1, len(picked))
        mass = sum(c.mass_captured for c in picked) / max(1, len(picked))
        lines.append(f"| {policy} | " + " | ".join(row) + f" | {recall:.2f}{_old_rule_mark(picked)} | {mass:.2f} |")
    return "\n".join(lines) + "\n"


def questions_per_sample(task: str) -> int:
    """Questions an evaluation sample of `task` asks, each scored alone (accuracy's unit)."""
    from offload.models import tasks

    return {"mqar": tasks.MQAR_EVAL_QUERIES, "vartrack": tasks.VARTRACK_QUERIES}.get(task, 1)


def oracle_exceptions(results: Results) -> tuple[int, list[dict]]:
    """(demote cells compared, the cells scoring above the oracle's cell of the same task, length and
    budget). Each exception carries `k`, the fewest questions on which the two can disagree (the
    accuracy difference times the questions asked), and `p_min` = 0.5 ** k: the smallest one-sided
    exact McNemar p-value any pairing of the same answers allows, i.e. the chance that a policy no
    better than the oracle wins k discordant questions out of k. Both ran on the same seeded samples.
    `above_full`: the cell also scores above the full cache, whose attention the oracle follows."""
    oracle = {(c.task, c.length, c.budget_pct): c for c in results.cells if c.policy == "oracle" and c.effect == "demote"}
    compared, exceptions = 0, []
    for c in results.cells:
        bound = oracle.get((c.task, c.length, c.budget_pct))
        if c.policy == "oracle" or c.effect != "demote" or bound is None:
            continue
        compared += 1
        if c.accuracy > bound.accuracy + 1e-9:
            questions = c.samples * questions_per_sample(c.task)
            k = round((c.accuracy - bound.accuracy) * questions)
            full = results.full_cache.get(c.task, {}).get(c.length)
            exceptions.append({"policy": c.policy, "task": c.task, "length": c.length, "budget_pct": c.budget_pct,
                               "accuracy": c.accuracy, "oracle": bound.accuracy, "questions": questions, "k": k,
                               "p_min": 0.5 ** k, "above_full": full is not None and c.accuracy > full + 1e-9})
    return compared, exceptions


def oracle_bound_note(results: Results) -> str:
    """One sentence for the README and the results file: how often the oracle bounds the other rows,
    and whether any exception could be more than sampling noise."""
    compared, exceptions = oracle_exceptions(results)
    if not exceptions:
        return f"The oracle row bounds every other row in all {compared} demote cells."
    ks = sorted(e["k"] for e in exceptions)
    cells = ", ".join(f"{e['policy']} {e['task']} {e['length']} {e['budget_pct']:g}%" for e in exceptions)
    return (f"The oracle row bounds the other rows in {compared - len(exceptions)} of {compared} demote cells. "
            f"The {len(exceptions)} exceptions ({cells}) are {ks[0]} to {ks[-1]} questions of the same seeded "
            f"samples, and none is significant: the smallest one-sided exact McNemar p-value any pairing of "
            f"those answers allows is {min(e['p_min'] for e in exceptions):.3g} (0.5^k for k questions won)."
            + _above_full_note(exceptions))


def _above_full_note(exceptions: list[dict]) -> str:
    above = sum(e["above_full"] for e in exceptions)
    if not above:
        return ""
    return (f" Of them, {above} also score above the full cache itself: the oracle keeps the pages exact "
            f"attention weighs most, so it follows the full cache, mistakes included.")


def _old_rule_mark(cells) -> str:
    """'†' where any of the cells shows recall (effect demote) measured against the earlier oracle rule."""
    return "†" if any(c.recall_rule != RECALL_RULE and c.effect == "demote" for c in cells) else ""


def _kib(num_bytes: float) -> str:
    return f"{num_bytes / 1024:.1f} KiB"


def _plot(results: Results, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for task in sorted({c.task for c in results.cells}):
        fig, ax = plt.subplots(figsize=(7, 4))
        for policy in results.meta["policies"]:
            cells = sorted((c for c in results.cells if c.task == task and c.policy == policy and c.effect == "demote"),
                           key=lambda c: c.budget_pct)
            budgets = sorted({c.budget_pct for c in cells})
            if not budgets:
                continue
            acc = [sum(c.accuracy for c in cells if c.budget_pct == b) / sum(1 for c in cells if c.budget_pct == b)
                   for b in budgets]
            ax.plot(budgets, acc, marker="o", label=policy)
        full = results.full_cache.get(task, {})
        if full:
            ax.axhline(sum(full.values()) / len(full), color="black", linestyle="--", label="full cache")
        ax.set_xscale("log")
        ax.set_xlabel("token budget (% of the context)")
        ax.set_ylabel("accuracy (mean over lengths)")
        ax.set_title(f"{task}: strict protocol")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out.with_name(f"{out.name}_{task}.png"), dpi=100)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from offload.models import embedded
    from offload.models.tasks import TASKS

    parser = argparse.ArgumentParser(prog="offload bench policies", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), choices=sorted(POLICIES))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(DEFAULT_BUDGETS),
                        help="token budgets in %% of the context")
    parser.add_argument("--lengths", nargs="+", type=int, default=list(DEFAULT_LENGTHS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--samples", type=int, default=20, help="samples per cell")
    parser.add_argument("--drop", action="store_true", help="also run eviction policies with effect=drop")
    parser.add_argument("--drop-only", action="store_true", help="run eviction policies with effect=drop only")
    parser.add_argument("--lenient", action="store_true", help="also score with the questions prefilled")
    parser.add_argument("--ppl-model", type=Path, default=SHARED / "models" / "stories260K")
    parser.add_argument("--ppl-text", type=Path, default=SHARED / "data" / "grimms.txt")
    parser.add_argument("--ppl-context", type=int, default=2048)
    parser.add_argument("--ppl-eval", type=int, default=128, help="text tokens scored as decode steps")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 policies, 1 budget, 1 length, 2 samples")
    parser.add_argument("--merge-from", type=Path, nargs="+", default=[],
                        help="JSON files of other runs (same samples): their cells replace or join --out's, then the "
                             "table is rewritten (a grid split over several processes)")
    parser.add_argument("--summary", action="store_true",
                        help="print the README's summary table of --out's JSON and exit")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cells already in --out's JSON (same samples) and run only the missing ones")
    parser.add_argument("--out", type=Path, default=Path("bench/results/policies"))
    args = parser.parse_args(argv)
    if args.quick:
        args.policies, args.budgets, args.lengths, args.samples = ["oracle", "tova"], [10.0], [512], 2
        args.tasks, args.ppl_context, args.ppl_eval = args.tasks[:2], 512, 16
    for n in args.lengths:
        if n < 64:
            parser.error(f"--lengths: {n} is too short (>= 64 tokens)")
    from tqdm import tqdm

    meta = {"model": "embedded", "command": "offload bench policies " + " ".join(argv or []),
            "samples": args.samples, "machine": machine(), "policies": args.policies, "tasks": args.tasks,
            "ppl_context": args.ppl_context, "ppl_eval": args.ppl_eval, "torch": torch.__version__}
    results = Results(meta)
    if args.summary:
        print(summary_table(load(args.out.with_suffix(".json"), meta, keep_meta=True), max(args.lengths)), end="")
        return
    if args.merge_from:
        results = load(args.out.with_suffix(".json"), meta, keep_meta=True)
        for path in args.merge_from:
            combine(results, load(path, meta, keep_meta=True))
        write(results, args.out)
        print(args.out.with_suffix(".md").read_text())
        return
    model, _ = embedded.load_embedded_model()
    if args.resume and args.out.with_suffix(".json").exists():
        results = load(args.out.with_suffix(".json"), meta)
    done = {(c.policy, c.effect, c.budget_pct, c.task, c.length) for c in results.cells}
    if args.drop_only:
        args.policies = [p for p in args.policies if POLICIES[p].evicts]
        meta["policies"] = args.policies
    effects = {p: (["drop"] if args.drop_only else ["demote", "drop"] if args.drop and POLICIES[p].evicts
                   else ["demote"]) for p in args.policies}
    total = sum(len(effects[p]) for p in args.policies) * len(args.budgets) * len(args.tasks) * len(args.lengths)
    has_ppl = args.ppl_model.exists() and args.ppl_text.exists() and not args.drop_only
    progress = tqdm(total=total + (len(args.policies) * len(args.budgets) if has_ppl else 0), desc="policies")
    for task in args.tasks:
        for length in args.lengths:
            todo = [(p, e, pct) for p in args.policies for pct in args.budgets for e in effects[p]
                    if (p, e, pct, task, length) not in done]
            progress.update(total // (len(args.tasks) * len(args.lengths)) - len(todo))
            if not todo:
                continue
            samples = embedded.task_samples(task, length, args.samples, seed=1)
            full_preds = _full_predictions(model, samples)
            results.full_cache.setdefault(task, {})[length] = _full_accuracy(samples, full_preds)
            for policy, effect, pct in todo:
                results.cells.append(run_task_cell(model, samples, policy, effect, pct, task, length, full_preds,
                                                   args.lenient))
                progress.update(1)
            write(results, args.out)  # partial results survive an interrupted run
    if has_ppl:
        measured = {(p.policy, p.budget_pct) for p in results.perplexity}
        wanted = [p for p in args.policies if any((p, pct) not in measured for pct in args.budgets)]
        progress.update((len(args.policies) - len(wanted)) * len(args.budgets))
        rows = perplexity_rows(args.ppl_model, args.ppl_text, args.ppl_context, args.ppl_eval, wanted, args.budgets,
                               progress) if wanted else []
        if rows:
            results.perplexity = rows[:1] + [p for p in results.perplexity[1:] if p.policy not in wanted] + rows[1:]
    progress.close()
    write(results, args.out)
    print(args.out.with_suffix(".md").read_text())
