"""`offload bench crosslayer`: training-free cross-layer KV reductions, KV bytes against quality.

For stories260K (a llama2.c checkpoint in ../shared/models, when present) and the embedded model,
each method at several levels, against the unreduced model on the same samples:

  kvsharer            KVSharer's search (most dissimilar layer pairs first), 1, 2, ... consumer layers;
                      the map runs through OffloadedModel(kv_sharing=...)
  kvsharer-similar    the same search ranking the most *similar* pairs first (the paper's foil)
  headmerge-mean      KV heads merged by groups: mean-pooled
  headmerge-procrustes  aligned (RoPE-commuting rotations for keys, orthogonal maps for values), then pooled
  headmerge-svd       the least-squares merged head (rank-1 per RoPE pair for keys, top subspace for values)
  minicache           adjacent layers merged from the middle layer up (SLERP directions, kept magnitudes,
                      outliers retained), at several retention thresholds
  minicache-from-1    the same from layer 1 up (beyond MiniCache's deeper half)
  xkv                 the prompt's KV factorised by one SVD per group of 4 layers (xKV), keys before RoPE,
                      at several ranks per layer
  xkv-2               the same with groups of 2 layers
  svd-single          the same with one SVD per layer (xKV's "single SVD" baseline, equal ranks per layer)

Quality uses the strict protocol (prefill, then each scored token a decode step): perplexity of
the last tokens of text windows (stories260K: TinyStories sample text; embedded:
`embedded.sample_text`), top-1 agreement with the unreduced model's predictions there, and for the
embedded model exact-match accuracy on passkey / MQAR / copy samples. KV bytes per token are
counted from what the cache holds after a prefill of the first text window (offload's pages, or the
MiniCache / xKV cache's tensors).
Calibration (KVSharer, Procrustes, SVD) uses other text than the evaluation.

    offload bench crosslayer            # every level, 4 text windows, 20 samples per task (minutes)
    offload bench crosslayer --quick    # a smoke run: fewer levels, 1 window, 2 samples per task

Results: bench/results/crosslayer.{json,md,png}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from offload.benchmarks import machine

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
HEAD_METHODS = ("mean", "procrustes", "svd")
METHOD_ORDER = ("baseline", "kvsharer", "kvsharer-similar", "headmerge-mean", "headmerge-procrustes",
                "headmerge-svd", "minicache", "minicache-from-1", "xkv", "xkv-2", "svd-single")
XKV_GROUPS = {"xkv": 4, "xkv-2": 2, "svd-single": 1}
XKV_RANK_SHARES = (0.5, 0.25, 0.125)  # per-layer rank / (kv_heads x head_dim)
TASKS = ("passkey", "mqar", "copy")


@dataclass
class Setup:
    """One model and its evaluation data: text windows ids [1, T] whose last `scored` tokens are
    scored, calibration sequences [1, C] (other text), ids [1, N] for counting bytes, task contexts."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    windows: list[torch.Tensor]
    scored: int
    calibration: list[torch.Tensor]
    bytes_ids: torch.Tensor
    task_context: int | None = None


@dataclass
class Row:
    model: str
    method: str
    level: str
    kv_bytes_per_token: float
    kv_reduction: float
    perplexity: float
    perplexity_ratio: float
    top1_agreement: float
    tasks: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    seconds: float = 0.0


def stories_setup(path: Path, text: Path, windows: int, context: int, scored: int, calibration: int) -> Setup:
    from offload.models import load_llama2c

    bins = [path] if path.suffix == ".bin" else sorted(p for p in path.glob("*.bin") if not p.name.startswith("tok"))
    model, tokenizer = load_llama2c(bins[0])
    ids = tokenizer.encode(text.read_text(encoding="utf-8", errors="replace"))
    # Evaluation windows from the start of the text, calibration sequences from its end: disjoint.
    need = windows * context + calibration * 128
    if len(ids) < need:
        raise ValueError(f"{text} has {len(ids)} tokens; this run needs {need}")
    evaluation = [torch.tensor([ids[i * context:(i + 1) * context]]) for i in range(windows)]
    cal = [torch.tensor([ids[len(ids) - (i + 1) * 128:len(ids) - i * 128]]) for i in range(calibration)]
    return Setup(bins[0].stem, model, tokenizer, evaluation, scored, cal, evaluation[0])


def embedded_setup(windows: int, context: int, scored: int, calibration: int, task_context: int) -> Setup:
    from offload.models import embedded

    model, tokenizer = embedded.load_embedded_model()
    evaluation = [embedded.sample_text(context, seed=100 + i) for i in range(windows)]
    cal = [embedded.sample_text(256, seed=200 + i) for i in range(calibration)]
    return Setup("embedded", model, tokenizer, evaluation, scored, cal, evaluation[0], task_context)


def variants(setup: Setup, quick: bool, min_similarity: float):
    """(method, level, factory) for every reduction of this model; a factory builds the `Variant`."""
    from offload.crosslayer import evaluation, head_merge, kvsharer
    from offload.crosslayer.minicache import MiniCache
    from offload.crosslayer.sharing import format_sharing
    from offload.crosslayer.xkv import XKVCache

    model = setup.model
    layers = model.config.num_hidden_layers
    yield "baseline", "full KV", lambda: evaluation.offloaded("baseline", "full KV", model)
    for order, method in (("dissimilar", "kvsharer"), ("similar", "kvsharer-similar")):
        if quick and order == "similar":
            continue
        result = kvsharer.search(model, setup.calibration, layers - 1, min_similarity, order)
        similarity = {s.consumer: s.similarity for s in result.steps if s.accepted}
        levels = result.levels[:1] if quick else result.levels
        for sharing in levels:
            level = f"{len(sharing)} of {layers} layers read another's KV"
            details = {"kv_sharing": format_sharing(sharing),
                       "calibration_similarity": round(min(similarity[c] for c in sharing if c in similarity), 4)}
            yield method, level, (lambda m=method, s=sharing, lv=level, d=details:
                                  evaluation.offloaded(m, lv, model, d, kv_sharing=s))
    kv_heads = model.config.num_key_value_heads
    groups = [g for g in range(2, kv_heads + 1) if kv_heads % g == 0]
    for name in HEAD_METHODS:
        for g in groups[:1] if quick else groups:
            level = f"{kv_heads} -> {kv_heads // g} KV heads"

            def make(name=name, g=g, level=level):
                merged = head_merge.merge_kv_heads(model, g, name, setup.calibration)
                return evaluation.offloaded(f"headmerge-{name}", level, merged, {"group_size": g})

            yield f"headmerge-{name}", level, make
    middle = layers // 2
    configs = [(middle, 1.0)] if quick else [(middle, 1.0), (middle, 0.7), (middle, 0.4), (1, 1.0)]
    for start, gamma in configs:
        # From the middle layer up is MiniCache's setting; from layer 1 goes beyond it (a series of its own).
        method = "minicache" if start == middle else f"minicache-from-{start}"
        level = f"from layer {start}, gamma {gamma:g}"

        def make(method=method, start=start, gamma=gamma, level=level):
            settings = MiniCache.for_model(model, start_layer=start, gamma=gamma)
            details = {"start_layer": start, "gamma": gamma, "t": settings.t, "pairs": settings.pairs}
            return evaluation.cached(method, level, model,
                                     lambda: MiniCache.for_model(model, start_layer=start, gamma=gamma), details)

        yield method, level, make
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_key_value_heads * head_dim
    for method, group in XKV_GROUPS.items():
        for share in XKV_RANK_SHARES[:1] if quick else XKV_RANK_SHARES:
            rank = max(1, round(share * width))
            level = f"rank {rank} of {width} per layer"

            def make(method=method, group=group, rank=rank, level=level):
                details = {"group_size": group, "key_rank": rank, "value_rank": rank}
                return evaluation.cached(method, level, model,
                                         lambda: XKVCache.for_model(model, rank, rank, group_size=group), details)

            yield method, level, make


def run_setup(setup: Setup, quick: bool, samples: int, min_similarity: float, progress) -> list[Row]:
    from offload.crosslayer import evaluation

    rows: list[Row] = []
    base_bytes = base_ppl = base_preds = None
    for method, level, make in variants(setup, quick, min_similarity):
        started = time.perf_counter()
        variant = make()
        try:
            kv = evaluation.bytes_per_token(variant, setup.bytes_ids)
            ppl, preds = evaluation.perplexity(variant, setup.windows, setup.scored)
            tasks = {}
            if setup.task_context is not None:
                for task in TASKS:
                    tasks[f"{task}@{setup.task_context}"] = evaluation.task_accuracy(
                        variant, setup.model, setup.tokenizer, task, setup.task_context, samples, seed=0)
            details = dict(variant.details)
            if method.startswith("minicache"):
                details["retained_share"] = round(_retained_share(variant, setup), 4)
        finally:
            variant.close()
        if method == "baseline":
            base_bytes, base_ppl, base_preds = kv, ppl, preds
        rows.append(Row(setup.name, method, level, kv, 1.0 - kv / base_bytes, ppl, ppl / base_ppl,
                        float((preds == base_preds).float().mean()), tasks, details, time.perf_counter() - started))
        progress(rows[-1])
    return rows


def _retained_share(variant, setup: Setup) -> float:
    """MiniCache: share of merged vectors kept unmerged after a prefill of the first window."""
    session = variant.open(setup.windows[0].shape[1])
    try:
        session.step(setup.windows[0])
        return session.cache.retained_share()
    finally:
        session.close()


def write(rows: list[Row], meta: dict, out: Path, studies: list[Path] = ()) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, meta))
    plot(rows, out.with_suffix(".png"), trained_points(studies))


def trained_points(paths) -> list[dict]:
    """The trained sharing configurations of `offload bench crosslayer-study` results (their JSON files),
    as points for the embedded model's panels: KV saved, perplexity ratio to their own standard model,
    and the mean of the same three tasks at the same context as here (passkey, mqar, copy @1024)."""
    points = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            continue
        for row in json.loads(path.read_text())["rows"]:
            if row["configuration"] == "standard":
                continue
            accuracy = [row["accuracy"].get(task, {}).get("1024") for task in TASKS]
            target = row["configuration"].partition("-")[2]
            command = row.get("train_command") or ""
            m, b = (re.search(rf"--{flag}[ =](\d+)", command) for flag in ("forward-passes", "backward-passes"))
            iteration = f", m = {m[1]}, b = {b[1]}" if m and b and target != "bottom" else ""
            points.append({"series": f"trained, {'bottom' if target == 'bottom' else 'top/middle'} target "
                                     f"({row['layers']} layers{iteration})",
                           "reduction": 100 * (1 - 1 / row["kv_reduction"]), "ppl_ratio": row["perplexity_ratio"],
                           "accuracy": (sum(accuracy) / len(accuracy)) if None not in accuracy else None})
    return points


def markdown(rows: list[Row], meta: dict) -> str:
    lines = ["# Cross-layer KV reductions, training-free", "",
             f"Command: `{meta['command']}`; machine: {meta['machine']}; torch {meta['torch']}.", "",
             "KV B/token: bytes the cache holds per token after a prefill (offload's pages; MiniCache's tensors). "
             "reduction: 1 - that / the unreduced model's. ppl: perplexity of the last "
             f"{meta['scored']} tokens of each text window, fed as decode steps after a prefill; ratio to the "
             "unreduced model; top-1: share of those positions where the argmax equals the unreduced model's. "
             "Tasks: exact-match accuracy, context prefilled, questions and answers as decode steps "
             f"({meta['samples']} samples per task). Every reduced row is an approximation of the model (none "
             "of these models was trained with its reduction).", ""]
    for model in dict.fromkeys(r.model for r in rows):
        sel = [r for r in rows if r.model == model]
        tasks = sorted({t for r in sel for t in r.tasks})
        lines += [f"## {model}", "", "| method | level | KV B/token | reduction | ppl | ppl ratio | top-1 | "
                  + "".join(f"{t} | " for t in tasks) + "details |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|"]
        for r in sel:
            details = "; ".join(f"{k} {v}" for k, v in r.details.items())
            lines.append(f"| {r.method} | {r.level} | {r.kv_bytes_per_token:.0f} | {100 * r.kv_reduction:.1f}% | "
                         f"{r.perplexity:.3f} | {r.perplexity_ratio:.3f} | {r.top1_agreement:.3f} | "
                         + "".join(f"{r.tasks[t]:.2f} | " for t in tasks) + f"{details} |")
        lines.append("")
    return "\n".join(lines)


def summary_table(rows: list[Row]) -> str:
    """README's summary: per model and method, each level as reduction -> perplexity ratio (mean task accuracy)."""
    lines = ["| model | method | KV reduction -> perplexity ratio (mean task accuracy) |", "|---|---|---|"]
    for model in dict.fromkeys(r.model for r in rows):
        for method in METHOD_ORDER:
            sel = [r for r in rows if r.model == model and r.method == method]
            if not sel:
                continue
            cells = []
            for r in sel:
                acc = f" ({sum(r.tasks.values()) / len(r.tasks):.2f})" if r.tasks else ""
                cells.append(f"{100 * r.kv_reduction:.0f}% -> {r.perplexity_ratio:.2f}{acc}")
            lines.append(f"| {model} | {method} | {', '.join(cells)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, trained: list[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    panels = [(m, "ppl") for m in models] + [(m, "tasks") for m in models if any(r.tasks for r in rows if r.model == m)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    markers = dict(zip(METHOD_ORDER, "*osDv^PXhd<>"))
    for ax, (model, kind) in zip(axes[0], panels):
        for method in METHOD_ORDER:
            sel = sorted((r for r in rows if r.model == model and r.method == method), key=lambda r: r.kv_reduction)
            if not sel:
                continue
            xs = [100 * r.kv_reduction for r in sel]
            ys = ([r.perplexity_ratio for r in sel] if kind == "ppl"
                  else [sum(r.tasks.values()) / len(r.tasks) for r in sel])
            ax.plot(xs, ys, marker=markers[method], linestyle="-" if len(sel) > 1 else "none", label=method)
        if model == "embedded":  # trained sharing: the same architecture, trained with its map (crosslayer-study)
            measure = "ppl_ratio" if kind == "ppl" else "accuracy"
            styles = itertools.cycle(("k+", "kx", "m+", "mx", "r*", "g^", "b1", "c2"))
            for series, style in zip(dict.fromkeys(p["series"] for p in trained), styles):
                sel = [p for p in trained if p["series"] == series and p[measure] is not None]
                ax.plot([p["reduction"] for p in sel], [p[measure] for p in sel], style, markersize=9, label=series)
        ax.set_xlabel("KV bytes per token saved (%)")
        if kind == "ppl":
            ax.set_yscale("log")
            ax.set_ylabel("perplexity / unreduced (log)")
            ax.set_title(f"{model}: perplexity")
        else:
            ax.set_ylabel("mean exact-match accuracy (passkey, mqar, copy)")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{model}: task accuracy")
        ax.grid(alpha=0.3)
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(6, len(legend)), fontsize=8)
    fig.suptitle("offload: cross-layer KV reductions, strict protocol (training-free: ratio to the unreduced model; "
                 "trained: ratio to its own standard model of the same depth)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(legend) + 5) // 6), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="offload bench crosslayer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: first level of each method, 1 window, "
                                                             "2 samples per task, 512-token contexts")
    parser.add_argument("--models", nargs="+", default=["stories260K", "embedded"], choices=["stories260K", "embedded"])
    parser.add_argument("--stories", type=Path, default=SHARED / "models" / "stories260K")
    parser.add_argument("--text", type=Path, default=SHARED / "data" / "tinystories-sample.txt",
                        help="stories260K's text (evaluation windows from its start, calibration from its end)")
    parser.add_argument("--windows", type=int, default=4, help="text windows per model")
    parser.add_argument("--context", type=int, default=512, help="tokens per stories260K window")
    parser.add_argument("--embedded-context", type=int, default=1024, help="tokens per embedded window")
    parser.add_argument("--scored", type=int, default=128, help="last tokens of each window scored as decode steps")
    parser.add_argument("--calibration", type=int, default=8, help="calibration sequences per model")
    parser.add_argument("--samples", type=int, default=20, help="samples per task (embedded)")
    parser.add_argument("--task-context", type=int, default=1024, help="task context tokens (embedded)")
    parser.add_argument("--min-similarity", type=float, default=0.5,
                        help="KVSharer: least cosine similarity of the last hidden states on calibration "
                             "to accept a pair")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (quality only: one avoids oversubscribing a shared machine)")
    parser.add_argument("--summary", action="store_true", help="print the README's summary of --out's JSON and exit")
    parser.add_argument("--study", type=Path, nargs="*",
                        default=[Path("bench/results/crosslayer_study.json"),
                                 Path("bench/results/crosslayer_study_8layers.json"),
                                 Path("bench/results/crosslayer_study_m7.json")],
                        help="crosslayer-study results whose trained configurations join the embedded model's plot")
    parser.add_argument("--plot-only", action="store_true", help="redraw --out's plot from its JSON and exit")
    parser.add_argument("--out", type=Path, default=Path("bench/results/crosslayer"))
    args = parser.parse_args(argv)
    if args.summary:
        data = json.loads(args.out.with_suffix(".json").read_text())
        print(summary_table([Row(**r) for r in data["rows"]]), end="")
        return
    if args.plot_only:
        data = json.loads(args.out.with_suffix(".json").read_text())
        plot([Row(**r) for r in data["rows"]], args.out.with_suffix(".png"), trained_points(args.study))
        print(f"wrote {args.out.with_suffix('.png')}")
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.windows, args.samples, args.scored = 1, 2, 32
        args.embedded_context = args.task_context = 512
    meta = {"command": " ".join(["offload bench crosslayer", *(argv or [])]), "machine": machine(),
            "torch": torch.__version__, "scored": args.scored, "samples": args.samples,
            "min_similarity": args.min_similarity, "windows": args.windows, "threads": args.threads}
    setups = []
    if "stories260K" in args.models:
        if args.stories.exists() and args.text.exists():
            setups.append(stories_setup(args.stories, args.text, args.windows, args.context, args.scored,
                                        args.calibration))
        else:
            print(f"stories260K: {args.stories} or {args.text} is missing; skipped")
    if "embedded" in args.models:
        setups.append(embedded_setup(args.windows, args.embedded_context, args.scored, args.calibration,
                                     args.task_context))

    def progress(row: Row) -> None:
        print(f"{row.model:12s} {row.method:22s} {row.level:40s} reduction {100 * row.kv_reduction:5.1f}%  "
              f"ppl ratio {row.perplexity_ratio:7.3f}  {row.tasks}  ({row.seconds:.0f} s)", flush=True)

    rows: list[Row] = []
    for setup in setups:
        rows += run_setup(setup, args.quick, args.samples, args.min_similarity, progress)
        write(rows, meta, args.out, args.study)  # partial results survive an interrupted run
    print(args.out.with_suffix(".md").read_text())
    print(f"wrote {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")
