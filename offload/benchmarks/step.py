"""What one decode step costs beside the attention kernels and the model's matmuls, and what
prefill costs against the unwrapped model: the runtime's own overhead.

    offload bench step            # batch 8, 1k context, exact and sparse; 8k and 32k prefills
    offload bench step --quick    # batch 2, 1k context, a 1k prefill, one repetition
    offload bench step --device cuda   # on a GPU; also counts host synchronisations per step

The embedded model on its pass-key prompts, device budget 25% of the KV cache, emulated 25 GB/s
link (the decode benchmark's setting for the embedded model). Each repetition profiles `--steps`
decode steps with cProfile and splits their wall time into the attention kernels (the paged
kernels, the dense device part, the prefill kernels, log-sum-exp merges, waiting for a host-part
worker), the model's matmuls (`torch.nn.functional.linear`) and the rest (bookkeeping, the
model's own Python, everything else); the profiler's overhead is scaled out by the unprofiled wall
time of the same steps. Prefill runs each of `--prefill-tokens` random tokens through the wrapped model
(chunks of `prefill_chunk`) and through the unwrapped model with a DynamicCache, in one pass and in
chunks of the same size (what chunking alone costs the plain model), interleaved.
Medians over `--repeats`. Results: bench/results/step.{json,md}.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from offload import OffloadedModel
from offload.benchmarks import command_line, machine
from offload.models import embedded
from offload.quality import kv_bytes

# Functions whose cumulative time counts as attention kernels: (module path ending, name).
KERNELS = {
    ("offload/kernels/__init__.py", "paged_attention"),
    ("offload/kernels/torch_ref.py", "dense_attention_scores"),
    ("offload/kernels/torch_ref.py", "prefill_attention_scores"),
    ("offload/kernels/torch_ref.py", "paged_attention_blocked"),
    ("offload/kernels/merge.py", "merge_partials"),
    ("offload/kernels/merge.py", "merge_parts"),
    ("concurrent/futures/_base.py", "result"),  # waiting for the host part on a worker thread
}
LINEAR = "<built-in method torch._C._nn.linear>"


def torch_calls(stats: pstats.Stats) -> int:
    """Calls into torch's C++ (functions and tensor methods) in a cProfile run: the bookkeeping's
    size in operations, which no machine's speed or load changes."""
    return sum(v[0] for k, v in stats.stats.items() if k[0] == "~" and ("torch" in k[2] or "Tensor" in k[2]))


def split_profile(stats: pstats.Stats) -> tuple[float, float, float]:
    """(profiled total, kernels, matmuls) in seconds from a cProfile run. A kernel's cumulative
    time is counted once even where kernels call kernels (the outermost call only)."""
    raw = stats.stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    total = sum(v[2] for v in raw.values())
    kernels = {k for k in raw if any(k[0].endswith(path) and k[2] == name for path, name in KERNELS)}

    def outermost(key) -> float:  # cumulative time of calls not made from inside another kernel
        callers = raw[key][4]
        if not callers:
            return raw[key][3]
        return sum(v[3] for caller, v in callers.items() if caller not in kernels)

    kernel_s = sum(outermost(k) for k in kernels)
    matmul_s = sum(v[2] for k, v in raw.items() if k[2] == LINEAR or k[2] == "linear" and k[0] == "~")
    return total, kernel_s, matmul_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def top_functions(stats: pstats.Stats, steps: int, count: int = 25) -> list[tuple[str, float, int]]:
    """The `count` functions with the most own time: (file:line(name), ms per step, calls per step)."""
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:count]
    return [(f"{Path(k[0]).name}:{k[1]}({k[2]})", v[2] / steps * 1e3, v[1] // steps) for k, v in rows]


def host_syncs(om, cache, token, steps: int) -> tuple[torch.Tensor, float, list[tuple[str, float]]]:
    """Decode `steps` steps with torch's CUDA sync debug mode on: the synchronising calls per step
    (each blocks the host until the GPU's queue drains) and where they are, most frequent first."""
    import warnings
    from collections import Counter

    where: Counter[str] = Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                token = om(token, past_key_values=cache).logits[:, -1:].argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{Path(w.filename).name}:{w.lineno}"] += 1
    per_step = sum(where.values()) / steps
    return token, per_step, [(site, n / steps) for site, n in where.most_common(20)]


def decode_step(model, mode: str, batch: int, context: int, steps: int, repeats: int) -> dict:
    device = model.device
    sample = embedded.task_samples("passkey", context, 1, seed=1)[0]
    prompt = torch.from_numpy(sample.input_ids[None, : sample.context_end].copy()).repeat(batch, 1).to(device)
    max_tokens = prompt.shape[1] + steps * (repeats + 2) + 8  # (warm-up, the repetitions, the sync count)
    budget = int(0.25 * kv_bytes(model, max_tokens, batch))
    rows, top, calls = [], [], 0.0
    link = 25.0 if device.type == "cpu" else 0.0  # a GPU has its own link
    with OffloadedModel(model, device_budget=budget, mode=mode, emulate_link_gbps=link) as om:
        cache = om.new_cache(batch, max_tokens)
        token = om(prompt, past_key_values=cache).logits[:, -1:].argmax(-1)
        for _ in range(min(4, steps)):  # warm up
            token = om(token, past_key_values=cache).logits[:, -1:].argmax(-1)
        for _ in range(repeats):
            profile = cProfile.Profile()
            _sync(device)
            start = time.perf_counter()
            profile.enable()
            for _ in range(steps):
                token = om(token, past_key_values=cache).logits[:, -1:].argmax(-1)
            _sync(device)
            profile.disable()
            wall = (time.perf_counter() - start) / steps
            stats = pstats.Stats(profile)
            total, kernel_s, matmul_s = split_profile(stats)
            scale = wall / (total / steps) if total else 1.0  # the profiler's overhead scaled out
            kernels, matmuls = kernel_s / steps * scale, matmul_s / steps * scale
            rows.append((wall, kernels, matmuls, wall - kernels - matmuls))
            top = top_functions(stats, steps)
            calls = torch_calls(stats) / steps
        syncs, sync_sites = None, []
        if device.type == "cuda":
            token, syncs, sync_sites = host_syncs(om, cache, token, steps)
    step, kernels, matmuls, rest = (statistics.median(r[i] for r in rows) * 1e3 for i in range(4))
    return {"mode": mode, "batch": batch, "context": context, "device": str(device), "step_ms": step,
            "unwrapped_step_ms": unwrapped_step(model, prompt, steps, repeats) * 1e3,
            "kernels_ms": kernels, "matmuls_ms": matmuls, "rest_ms": rest, "torch_calls_per_step": calls,
            "host_syncs_per_step": syncs,
            "sync_sites": sync_sites, "top_functions": top}


@torch.inference_mode()
def unwrapped_step(model, prompt: torch.Tensor, steps: int, repeats: int) -> float:
    """Seconds per greedy decode step of the unwrapped model (a DynamicCache) after the same prompt:
    the median of `repeats` runs of `steps` steps."""
    cache = DynamicCache()
    token = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    times = []
    for _ in range(repeats):
        _sync(model.device)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(model.device)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def prefill(model, tokens: int, repeats: int) -> dict:
    device = model.device
    ids = torch.randint(5, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    om = OffloadedModel(model)
    chunk = om.config.prefill_chunk

    def plain_in_chunks() -> None:
        cache = DynamicCache()
        for first in range(0, tokens, chunk):
            model(ids[:, first : first + chunk], past_key_values=cache, use_cache=True)

    runs = {"offload": lambda: om(ids), "unwrapped": lambda: model(ids, past_key_values=DynamicCache(), use_cache=True),
            "unwrapped_chunked": plain_in_chunks}
    times: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for rep in range(repeats + 1):  # the first round warms up
            for name, run in runs.items():
                if name == "offload":
                    om.wrap()
                _sync(device)
                start = time.perf_counter()
                with torch.inference_mode():
                    run()
                _sync(device)
                took = time.perf_counter() - start
                if name == "offload":
                    om.unwrap()
                if rep:
                    times[name].append(took)
    finally:
        om.unwrap()
        om.close()
    w, p, c = (statistics.median(times[name]) for name in runs)
    return {"tokens": tokens, "chunk": chunk, "offload_s": w, "unwrapped_s": p, "ratio": w / p,
            "unwrapped_chunked_s": c, "ratio_chunked": w / c}


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = ["# One decode step and prefill against the unwrapped model (embedded)", "",
             f"Command: `{meta['command']}`; machine: {meta['machine']}; torch {meta['torch']}.", "",
             "Decode: medians of the repetitions; *rest* = step - attention kernels - model matmuls "
             "(bookkeeping, the model's own Python, everything else); *torch calls*: calls into torch per step "
             "(operations, whatever the machine's speed); *unwrapped*: the plain model's step after the same "
             "prompt (a DynamicCache, every key on the device).", "",
             "| mode | batch | context | step | attention kernels | model matmuls | rest | torch calls | unwrapped |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results["decode"]:
        calls, plain = row.get("torch_calls_per_step"), row.get("unwrapped_step_ms")
        lines.append(f"| {row['mode']} | {row['batch']} | {row['context']} | {row['step_ms']:.2f} ms | "
                     f"{row['kernels_ms']:.2f} ms | {row['matmuls_ms']:.2f} ms | {row['rest_ms']:.2f} ms | "
                     f"{'—' if calls is None else f'{calls:.0f}'} | {'—' if plain is None else f'{plain:.2f} ms'} |")
    for row in results["decode"]:
        if row.get("host_syncs_per_step") is not None:
            sites = ", ".join(f"{site} ({n:g})" for site, n in row["sync_sites"][:8])
            lines += ["", f"{row['mode']}: {row['host_syncs_per_step']:g} host synchronisations per step "
                          f"(torch.cuda.set_sync_debug_mode); most frequent: {sites}."]
    if results["prefill"]:
        lines += ["", "*Unwrapped* prefills in one pass; *unwrapped, chunked* feeds the same chunks as offload "
                  "through a DynamicCache (what chunking alone costs the plain model).", "",
                  "| prefill tokens | chunk | offload | unwrapped | ratio | unwrapped, chunked | ratio to chunked |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {row['tokens']} | {row['chunk']} | {row['offload_s']:.3f} s | {row['unwrapped_s']:.3f} s | "
                  f"{row['ratio']:.2f}x | {row['unwrapped_chunked_s']:.3f} s | {row['ratio_chunked']:.2f}x |"
                  for row in results["prefill"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="offload bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2, 1k context, a 1k prefill, 1 repetition")
    parser.add_argument("--batch", type=int, default=None, help="sequences per decode step (default 8)")
    parser.add_argument("--context", type=int, default=None, help="prompt tokens before decoding (default 1024)")
    parser.add_argument("--modes", nargs="+", choices=["exact", "sparse"], default=["exact", "sparse"])
    parser.add_argument("--steps", type=int, default=16, help="decode steps per profiled repetition")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions (default 5)")
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=None, help="prompt lengths for the "
                        "prefill comparison (default 8192 32768; 0 leaves it out)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu (default; the device tier emulated, 25 GB/s link) or cuda (a real GPU; decode rows "
                             "also count the host synchronisations per step and where they happen)")
    parser.add_argument("--out", default="bench/results/step")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    batch = args.batch or (2 if args.quick else 8)
    context = args.context or 1024
    repeats = args.repeats or (1 if args.quick else 5)
    prefill_tokens = args.prefill_tokens if args.prefill_tokens is not None else ([1024] if args.quick else [8192, 32768])
    for name, value in (("--batch", batch), ("--context", context), ("--steps", args.steps), ("--repeats", repeats)):
        if value < 1:
            parser.error(f"{name} must be at least 1; got {value}")
    if any(tokens < 0 for tokens in prefill_tokens):
        parser.error(f"--prefill-tokens must be 0 or more; got {prefill_tokens}")
    meta = {"command": command_line("step", argv), "machine": machine(),
            "torch": torch.__version__}
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    model = embedded.load_embedded_model()[0].to(args.device)
    results = {"meta": meta, "decode": [decode_step(model, mode, batch, context, args.steps, repeats)
                                        for mode in args.modes],
               "prefill": [prefill(model, tokens, repeats) for tokens in prefill_tokens if tokens]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
