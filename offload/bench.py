"""`offload bench` / `python -m offload.bench`: the quality sweep and the speed benchmarks.

    offload bench quality [--model embedded|PATH] [--text FILE] [--context 2048] ...
    offload bench prefix  [--quick]   # time to first token with and without prefix reuse, 200-request soak
    offload bench decode  [--quick]   # end-to-end decode against whole-layer offload, emulated link
    offload bench kernels [--quick]   # CPU paged-attention kernels against the read bandwidth
    offload bench tiers   [--quick]   # a 32k context decoded from disk and Ray lenders vs the two-tier store
    offload bench crosslayer [--quick]  # training-free cross-layer KV reductions: KV bytes vs quality
    offload bench crosslayer-study --models-dir DIR  # trained cross-layer sharing configurations side by side
    offload bench step    [--quick]   # one decode step beside its kernels and matmuls; prefill vs unwrapped

Every benchmark ships with the package (offload/benchmarks/), so these run from an installed
wheel too. Results go to bench/results/ under the current directory (JSON, Markdown and, for
the sweep, a PNG plot); `--out` changes it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# subcommand -> module in offload.benchmarks with main(argv)
BENCHMARKS = {"prefix": "prefix", "decode": "decode", "kernels": "kernels", "policies": "policies", "tiers": "tiers",
              "crosslayer": "crosslayer", "crosslayer-study": "crosslayer_study", "step": "step"}


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def quality(argv: list[str]) -> None:
    from offload.quality import DEFAULT_BUDGETS, full_cache_tasks, load_model, sweep, write_results

    parser = argparse.ArgumentParser(prog="offload bench quality", description="Quality vs device budget sweep.")
    parser.add_argument("--model", default="embedded", help="'embedded', a llama2.c checkpoint (folder or .bin) or a transformers directory")
    parser.add_argument("--text", help="text file for perplexity and greedy agreement (e.g. ../shared/data/grimms.txt)")
    parser.add_argument("--context", type=int, default=2048, help="tokens of text per perplexity/agreement run")
    parser.add_argument("--eval-tokens", type=int, default=256, help="tokens scored one decode step at a time")
    parser.add_argument("--gen-tokens", type=int, default=64, help="greedy tokens compared with the full cache")
    parser.add_argument("--budgets", type=_floats, default=list(DEFAULT_BUDGETS), help="device budgets in %% of the KV cache")
    parser.add_argument("--modes", type=_words, default=["exact", "sparse"])
    parser.add_argument("--prefetch", type=_words, default=["on", "off"])
    parser.add_argument("--task-contexts", type=lambda t: [int(x) for x in _words(t)], default=[1024, 2048, 4096])
    parser.add_argument("--task-samples", type=int, default=20)
    parser.add_argument("--tasks", type=_words, default=None,
                        help="retrieval tasks to score (embedded model; default: passkey,mqar,copy)")
    parser.add_argument("--page-size", type=int, default=None)
    parser.add_argument("--token-budget", type=int, default=None,
                        help="tokens the query selects (default: what the device budget holds)")
    parser.add_argument("--sink-tokens", type=int, default=None)
    parser.add_argument("--recent-tokens", type=int, default=None)
    parser.add_argument("--out", default="bench/results/quality")
    args = parser.parse_args(argv)
    for value in args.prefetch:
        if value not in ("on", "off"):
            parser.error(f"--prefetch takes on and/or off, got {value!r}")
    for mode in args.modes:
        if mode not in ("exact", "sparse"):
            parser.error(f"--modes takes exact and/or sparse, got {mode!r}")
    if args.tasks is not None:
        from offload.models.tasks import TASKS

        for task in args.tasks:
            if task not in TASKS:
                parser.error(f"--tasks takes {', '.join(TASKS)}; got {task!r}")
    loaded = load_model(args.model)
    text_ids = None
    if args.text:
        if loaded.tokenizer is None:
            parser.error(f"--text needs a tokenizer, and none was found for {args.model!r}")
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
        import torch

        ids = loaded.tokenizer.encode(text)
        if len(ids) < args.context:
            parser.error(f"{args.text} has {len(ids)} tokens, fewer than --context {args.context}")
        text_ids = torch.tensor([ids[: args.context]])
    elif loaded.default_text is not None:
        text_ids = loaded.default_text(args.context)
    overrides = {k: v for k, v in (("page_size", args.page_size), ("token_budget", args.token_budget),
                                   ("sink_tokens", args.sink_tokens), ("recent_tokens", args.recent_tokens))
                 if v is not None}
    points = sweep(
        loaded, text_ids, context=args.context, eval_tokens=args.eval_tokens, gen_tokens=args.gen_tokens,
        budgets=args.budgets, modes=args.modes, prefetch=[v == "on" for v in args.prefetch],
        task_contexts=args.task_contexts, task_samples=args.task_samples, task_names=args.tasks, overrides=overrides,
    )
    full_tasks = full_cache_tasks(loaded, args.task_contexts, args.task_samples, args.tasks)
    meta = {"model": loaded.name, "command": "offload bench quality " + " ".join(argv),
            "text": args.text or ("embedded.sample_text" if text_ids is not None else None),
            "context": args.context, "overrides": overrides, "task_samples": args.task_samples,
            "task_accuracy_full_cache": full_tasks}
    out = Path(args.out)
    write_results(points, out, meta)
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # `offload bench ...` through the console script
        argv = argv[1:]
    commands = ["quality", *BENCHMARKS]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    command, rest = argv[0], argv[1:]
    if command == "quality":
        quality(rest)
    elif command in BENCHMARKS:
        importlib.import_module(f"offload.benchmarks.{BENCHMARKS[command]}").main(rest)
    else:
        raise SystemExit(f"unknown command {command!r}; expected one of {', '.join(commands)}")


if __name__ == "__main__":
    main()
