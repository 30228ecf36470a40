"""The quality-vs-memory sweep: how outputs hold up as the device budget shrinks.

For each point of a grid (device budget as a share of the KV cache x mode x prefetch) it
measures, against the same model with its full cache:

- perplexity on a text, the evaluated tokens fed one at a time as decode steps (where sparse
  mode and prefetch act), after a prefill of the rest of the context;
- greedy agreement: the share of positions where N generated tokens equal the full cache's;
- task accuracy on the embedded model's retrieval tasks (when the model has them);
- prefetch recall, mass coverage and host->device bytes per token of the decode steps.

Points whose budget is below what the configuration needs are reported as skipped, with the
minimum, never silently raised.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from offload import OffloadedModel
from offload.hf.layers import layout_from_model_config

DEFAULT_BUDGETS = (1.0, 2.0, 5.0, 10.0, 25.0, 100.0)
TASK_TAIL_TOKENS = 16  # a task sample is its context plus at most this many question/answer tokens


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    name: str
    # (wrapped model or None for the full cache, context_tokens, num_samples, seed, names or None for all)
    # -> {task: accuracy}
    tasks: Callable | None = None
    default_text: Callable | None = None  # (num_tokens) -> ids [1, num_tokens], when no --text is given


def load_model(spec: str) -> LoadedModel:
    """'embedded', a llama2.c folder or .bin (e.g. stories260K), or a local transformers directory."""
    if spec == "embedded":
        from offload.models import embedded

        model, tokenizer = embedded.load_embedded_model()

        def tasks(wrapped, context_tokens, num_samples, seed, names=None):
            # wrapped=None: the plain model with its full cache (one teacher-forced forward).
            score = partial(offloaded_argmax, wrapped) if wrapped is not None else None
            return {task: embedded.task_accuracy(model, tokenizer, task, context_tokens, num_samples, seed,
                                                 score_fn=score)
                    for task in (embedded.tasks.TASKS if names is None else names)}

        return LoadedModel(model, tokenizer, "embedded", tasks, embedded.sample_text)
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"model {spec!r}: no such file or directory; expected 'embedded', a llama2.c checkpoint or a transformers directory")
    bins = [path] if path.suffix == ".bin" else sorted(p for p in path.glob("*.bin") if not p.name.startswith("tok"))
    if bins and not (path / "config.json").exists():
        from offload.models import load_llama2c

        model, tokenizer = load_llama2c(bins[0])
        return LoadedModel(model, tokenizer, bins[0].stem)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return LoadedModel(model, tokenizer, path.name)


def kv_bytes(model, num_tokens: int, batch_size: int = 1) -> int:
    """Bytes of the full KV cache (all layers, keys and values) for `num_tokens` tokens."""
    layout = layout_from_model_config(model.config, 1, next(model.parameters()).dtype)
    return layout.num_layers * layout.page_bytes * num_tokens * batch_size


@dataclass
class Point:
    budget_pct: float
    mode: str
    prefetch: bool
    device_budget: int = 0
    skipped: str | None = None
    perplexity: float | None = None
    perplexity_full: float | None = None
    perplexity_ratio: float | None = None
    greedy_agreement: float | None = None  # free-running: one early divergence lowers every later position
    top1_agreement: float | None = None  # teacher-forced: argmax equals the full cache's, same true prefix
    task_accuracy: dict = field(default_factory=dict)
    prefetch_recall: float | None = None
    mass_coverage: float | None = None
    h2d_bytes_per_token: float | None = None
    seconds: float = 0.0


@torch.inference_mode()
def full_cache_nll(model, ids: torch.Tensor, start: int) -> tuple[float, torch.Tensor]:
    """(mean NLL of tokens ids[start:], argmax predictions [T - start]) with the plain model (one forward)."""
    logits = model(ids).logits[0, start - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, start:])), logits.argmax(-1)


def offloaded_argmax(om: OffloadedModel, ids: torch.Tensor, start: int) -> torch.Tensor:
    """[T - start] argmax predictions for positions start..T-1 of ids [1, T]: prefill ids[:, :start],
    then feed the true tokens one decode step at a time (an `embedded.ScoreFn`)."""
    return offloaded_nll(om, ids, start)[2]


@torch.inference_mode()
def offloaded_nll(om: OffloadedModel, ids: torch.Tensor, start: int):
    """Mean NLL of ids[start:]: prefill ids[:start], then one decode step per token.
    Returns (nll, stats, argmax predictions [T - start])."""
    cache = om.new_cache(1, ids.shape[1])
    try:
        logits = om(ids[:, :start], past_key_values=cache).logits[:, -1]
        before = cache.stats()
        total = 0.0
        predicted = []
        for t in range(start, ids.shape[1]):
            total += float(torch.nn.functional.cross_entropy(logits.float(), ids[:, t]))
            predicted.append(logits.argmax(-1))
            if t + 1 < ids.shape[1]:
                logits = om(ids[:, t : t + 1], past_key_values=cache).logits[:, -1]
        after = cache.stats()
    finally:
        cache.release()
    steps = ids.shape[1] - start
    delta = {
        "needed": after.needed_pages - before.needed_pages,
        "on_device": after.needed_on_device - before.needed_on_device,
        "mass": after.mass_device - before.mass_device,
        "rows": after.mass_rows - before.mass_rows,
        "h2d": after.h2d_bytes - before.h2d_bytes,
    }
    stats = {
        "prefetch_recall": delta["on_device"] / delta["needed"] if delta["needed"] else 1.0,
        "mass_coverage": delta["mass"] / delta["rows"] if delta["rows"] else 1.0,
        "h2d_bytes_per_token": delta["h2d"] / max(1, steps - 1),
    }
    return total / steps, stats, torch.cat(predicted)


def sweep(
    loaded: LoadedModel,
    text_ids: torch.Tensor | None,
    *,
    context: int = 2048,
    eval_tokens: int = 256,
    gen_tokens: int = 64,
    budgets=DEFAULT_BUDGETS,
    modes=("exact", "sparse"),
    prefetch=(True, False),
    task_contexts=(1024, 2048, 4096),
    task_samples: int = 20,
    task_names=None,
    overrides: dict | None = None,
    progress: bool = True,
) -> list[Point]:
    """Run the grid; returns one Point per (budget, mode, prefetch)."""
    from tqdm import tqdm

    model = loaded.model
    overrides = dict(overrides or {})
    grid = [(b, m, p) for b in budgets for m in modes for p in prefetch]
    ppl_ids = text_ids[:, :context] if text_ids is not None else None
    full_nll, full_argmax = full_cache_nll(model, ppl_ids, context - eval_tokens) if ppl_ids is not None else (None, None)
    prompt = ppl_ids[:, : context - gen_tokens] if ppl_ids is not None else None
    reference = None
    if prompt is not None and gen_tokens:
        with torch.inference_mode():
            reference = model.generate(prompt, max_new_tokens=gen_tokens, do_sample=False, min_new_tokens=gen_tokens)
    task_names = tuple(task_names) if task_names is not None else None  # None: all the model has
    task_results: dict = {}
    points = []
    for budget_pct, mode, use_prefetch in tqdm(grid, desc="quality sweep", disable=not progress):
        point = Point(budget_pct, mode, use_prefetch)
        start = time.perf_counter()
        om = OffloadedModel(model, mode=mode, prefetch=use_prefetch, **overrides)
        try:
            point.device_budget = int(budget_pct / 100 * kv_bytes(model, context))
            minimum = om.minimum_device_budget(1, context)
            if point.device_budget < minimum:
                point.skipped = (f"budget {point.device_budget} B is below the {minimum} B this configuration needs "
                                 f"({100 * minimum / kv_bytes(model, context):.1f}% of the KV cache)")
                points.append(point)
                continue
            om.config.device_budget = point.device_budget
            if ppl_ids is not None:
                nll, stats, argmax = offloaded_nll(om, ppl_ids, context - eval_tokens)
                point.perplexity, point.perplexity_full = math.exp(nll), math.exp(full_nll)
                point.top1_agreement = float((argmax == full_argmax).float().mean())
                point.perplexity_ratio = point.perplexity / point.perplexity_full
                point.prefetch_recall = stats["prefetch_recall"]
                point.mass_coverage = stats["mass_coverage"]
                point.h2d_bytes_per_token = stats["h2d_bytes_per_token"]
            if reference is not None:
                out = om.generate(prompt, max_new_tokens=gen_tokens, do_sample=False, min_new_tokens=gen_tokens)
                new, ref_new = out[0, prompt.shape[1] :], reference[0, prompt.shape[1] :]
                n = min(len(new), len(ref_new))
                point.greedy_agreement = float((new[:n] == ref_new[:n]).float().mean()) if n else 0.0
            if loaded.tasks is not None and task_names != ():
                # Prefetch decides where pages are read, never what is attended (unless sparse
                # misses are skipped), so the answers are the same with it on and off.
                key = (budget_pct, mode, use_prefetch if om.config.sparse_misses == "skip" else None)
                if key not in task_results:
                    task_results[key] = {}
                    for task_context in task_contexts:
                        need = om.minimum_device_budget(1, task_context + TASK_TAIL_TOKENS)
                        budget = int(budget_pct / 100 * kv_bytes(model, task_context + TASK_TAIL_TOKENS))
                        if budget < need:
                            continue
                        om.config.device_budget = budget
                        accuracy = loaded.tasks(om, task_context, task_samples, 0, task_names)
                        task_results[key].update({f"{name}@{task_context}": acc for name, acc in accuracy.items()})
                point.task_accuracy.update(task_results[key])
        finally:
            om.unwrap()
            point.seconds = time.perf_counter() - start
        points.append(point)
    return points


def full_cache_tasks(loaded: LoadedModel, task_contexts, task_samples: int, task_names=None) -> dict[str, float]:
    """`{"task@context": accuracy}` of the plain model on the same seeded samples the sweep scores."""
    if loaded.tasks is None:
        return {}
    result = {}
    for task_context in task_contexts:
        accuracy = loaded.tasks(None, task_context, task_samples, 0, task_names)
        result.update({f"{name}@{task_context}": acc for name, acc in accuracy.items()})
    return result


def write_results(points: list[Point], out: Path, meta: dict) -> None:
    """JSON, a Markdown table and a plot (quality and bytes moved vs budget)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "points": [asdict(p) for p in points]}, indent=2))
    tasks = sorted({k for p in points for k in p.task_accuracy})
    header = ["budget % of KV", "mode", "prefetch", "ppl / full", "top-1 agreement", "greedy agreement", *tasks,
              "recall", "mass coverage", "h2d KiB/token"]
    lines = [f"Quality sweep: {meta.get('model')} (`{meta.get('command')}`)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value, spec=".3f"):
        return "—" if value is None else format(value, spec)

    full = meta.get("task_accuracy_full_cache")
    if full:
        cells = ["full cache", "—", "—", "1.0000", "1.000", "1.000", *[fmt(full.get(t)) for t in tasks], "—", "1.000", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    for p in points:
        if p.skipped:
            lines.append(f"| {p.budget_pct:g} | {p.mode} | {'on' if p.prefetch else 'off'} | skipped: {p.skipped} |"
                         + " |" * (len(header) - 4))
            continue
        cells = [f"{p.budget_pct:g}", p.mode, "on" if p.prefetch else "off", fmt(p.perplexity_ratio, ".4f"),
                 fmt(p.top1_agreement), fmt(p.greedy_agreement), *[fmt(p.task_accuracy.get(t)) for t in tasks], fmt(p.prefetch_recall),
                 fmt(p.mass_coverage), fmt(None if p.h2d_bytes_per_token is None else p.h2d_bytes_per_token / 1024, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(points, out.with_suffix(".png"), meta)


def _plot(points: list[Point], path: Path, meta: dict) -> None:
    """Three panels against the budget: quality per mode (prefetch never changes it), prefetch
    recall and host->device bytes per token per mode and prefetch setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_q, ax_r, ax_b) = plt.subplots(1, 3, figsize=(15, 4.2))
    done = [p for p in points if not p.skipped]
    tasks = sorted({k for p in done for k in p.task_accuracy})
    longest = max((int(t.split("@")[1]) for t in tasks), default=None)
    for mode in sorted({p.mode for p in done}):
        sel = [p for p in done if p.mode == mode and p.prefetch == done[0].prefetch]
        xs = [p.budget_pct for p in sel]
        if any(p.top1_agreement is not None for p in sel):
            ax_q.plot(xs, [p.top1_agreement for p in sel], marker="o", label=f"{mode}: top-1 agreement")
        for task in tasks:
            if int(task.split("@")[1]) == longest:
                ax_q.plot(xs, [p.task_accuracy.get(task) for p in sel], marker="s", linestyle="--", label=f"{mode}: {task}")
        for prefetch in (True, False):
            sel = [p for p in done if p.mode == mode and p.prefetch == prefetch]
            if sel:
                label = f"{mode}, prefetch {'on' if prefetch else 'off'}"
                xs = [p.budget_pct for p in sel]
                ax_r.plot(xs, [p.prefetch_recall for p in sel], marker="o", label=label)
                ax_b.plot(xs, [(p.h2d_bytes_per_token or 0) / 1024 for p in sel], marker="o", label=label)
    full = meta.get("task_accuracy_full_cache") or {}
    for task, acc in full.items():
        if longest is not None and int(task.split("@")[1]) == longest:
            ax_q.axhline(acc, color="gray", linewidth=0.8, linestyle=":")
    for ax in (ax_q, ax_r, ax_b):
        ax.set_xscale("log")
        ax.set_xlabel("device budget (% of the KV cache)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_q.set_ylabel("vs. full cache (dotted: full-cache task accuracy)")
    ax_q.set_ylim(-0.02, 1.02)
    ax_r.set_ylabel("prefetch recall")
    ax_r.set_ylim(-0.02, 1.02)
    ax_b.set_ylabel("host->device KiB per token")
    fig.suptitle(f"offload quality sweep: {meta.get('model')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
