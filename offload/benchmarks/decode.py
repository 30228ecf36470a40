"""End-to-end decode benchmark: whole-layer offload vs offload's tiered KV, on an emulated link.

    offload bench decode            # 8k and 32k prompts, 256 new tokens
    offload bench decode --quick    # an 8k prompt, 32 new tokens
    offload bench decode --device cuda   # on a GPU: its own PCIe link, (a) is transformers'
                                         # DynamicCache(offloading=True); no emulation
    (python bench/bench_decode.py from a source tree runs the same)

A Llama-like layout (32 query heads, 8 KV heads, head_dim 128; a small hidden size and few
layers keep the CPU compute small, random weights), decoded greedily after a long prompt, with
every host<->device copy taking bytes / 25 GB/s (a PCIe 4.0 x16 link). `token_budget` is left at
its default: what the device budget can hold. Configurations, all in
one run, all with the same decode loop:

  (a) whole-layer offload: transformers' DynamicCache with every layer's full KV copied in each
      step, the next layer's copy overlapping the current layer (what `offloading=True` does)
  (b) offload exact, no prefetch    (c) offload exact + prefetch
  (d) offload sparse + prefetch     (e) offload sparse, no prefetch   (sparse mode's defaults otherwise)
  (f) offload sparse, no prefetch, misses skipped (`sparse_misses="skip"`): no host part at all, the
      speed a perfect prefetcher that cost nothing would reach here, so (f) / (e) is the most (d)
      can gain on this machine (its tokens differ: it attends less)

The device budget is 10% of the KV cache at the final length.

`--model embedded` runs the package's trained model instead, on its pass-key prompts (the
context before the question, then greedy decoding), with a 25% device budget by default: random
weights attend almost uniformly, so only a trained model shows what selection and speculation
do when attention moves. Reported per configuration:
tokens/s, stall share of decode time, h2d bytes per token and its ratio to (a), prefetch recall,
mass coverage and greedy-token agreement with (a). Results: bench/results/decode.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from offload import OffloadedModel
from offload.benchmarks import command_line, projection
from offload.store.transfer import TransferEngine

PROJECTED = (32768, 131072)  # contexts the projection is printed for
RESULTS = Path("bench/results")  # relative to where it runs: the package may be installed anywhere


def build_model(num_layers: int, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=num_layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=65536,
        rope_theta=500000.0,
    )
    return LlamaForCausalLM(config).eval().to(dtype)


def kv_bytes_per_token_layer(model) -> int:
    cfg = model.config
    return 2 * cfg.num_key_value_heads * cfg.head_dim * next(model.parameters()).element_size()


class WholeLayerOffload:
    """Emulates transformers' offloaded DynamicCache: before layer l runs, its whole KV must have
    crossed the link; layer l+1's copy starts when layer l starts (one layer of overlap)."""

    def __init__(self, model, link_gbps: float) -> None:
        self.model = model
        self.engine = TransferEngine(link_gbps)
        self.layers = model.model.layers
        self.tokens = 0  # tokens in the cache
        self.h2d_bytes = 0
        self.stall_s = 0.0
        self.active = False
        self._copies: dict[int, threading.Thread] = {}
        self._handles = [layer.register_forward_pre_hook(self._before, with_kwargs=False)
                         for layer in self.layers]
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}

    def _copy(self, layer_idx: int) -> None:
        num_bytes = self.tokens * kv_bytes_per_token_layer(self.model)
        self.h2d_bytes += num_bytes
        thread = threading.Thread(target=self.engine._link_wait, args=(num_bytes,))
        thread.start()
        self._copies[layer_idx] = thread

    def _before(self, module, args) -> None:
        if not self.active:
            return
        idx = self._index[id(module)]
        if idx == 0 and 0 not in self._copies:
            self._copy(0)  # nothing to overlap the first layer's copy with
        start = time.perf_counter()
        self._copies.pop(idx).join()
        self.stall_s += time.perf_counter() - start
        if idx + 1 < len(self.layers):
            self._copy(idx + 1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _elapsed(start: float, result: torch.Tensor) -> float:
    """Seconds since `start` once `result` exists (waits for a GPU's queued work)."""
    int(result.reshape(-1)[0])
    return time.perf_counter() - start


@torch.inference_mode()
def decode_loop(step, first_token: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """Greedy decode with `step(token) -> logits`; returns tokens and seconds."""
    tokens, token = [], first_token
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = step(token)
        token = logits[:, -1:].argmax(-1)
        tokens.append(int(token))
    return tokens, time.perf_counter() - start


@torch.inference_mode()
def run_baseline(model, prompt, new_tokens, link_gbps):
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    logits = model(prompt, past_key_values=cache, use_cache=True).logits
    first = logits[:, -1:].argmax(-1)
    prefill_s = _elapsed(start, first)
    emu = WholeLayerOffload(model, link_gbps)
    emu.active = True

    def step(token):
        emu.tokens = cache.get_seq_length()
        return model(token, past_key_values=cache, use_cache=True).logits

    try:
        tokens, seconds = decode_loop(step, first, new_tokens)
    finally:
        emu.remove()
    return {
        "tokens": [int(first)] + tokens[:-1], "prefill_s": prefill_s, "decode_s": seconds,
        "tokens_per_s": new_tokens / seconds, "stall_share": emu.stall_s / seconds,
        "h2d_bytes_per_token": emu.h2d_bytes / new_tokens,
        "prefetch_recall": None, "mass_coverage": None,
        # Every layer's KV crosses the link and is read on the device, each step.
        "device_read_bytes_per_token": emu.h2d_bytes / new_tokens, "host_read_bytes_per_token": 0.0,
    }


@torch.inference_mode()
def run_baseline_cuda(model, prompt, new_tokens):
    """(a) on a GPU: transformers' own offloaded cache (`DynamicCache(offloading=True)`), whose
    layers' KV goes back to the host after use and returns, the next layer's prefetched, over the
    real PCIe link. Bytes are counted as the emulation counts them: every layer's KV, each step."""
    cache = DynamicCache(config=model.config, offloading=True)
    start = time.perf_counter()
    logits = model(prompt, past_key_values=cache, use_cache=True).logits
    first = logits[:, -1:].argmax(-1)
    prefill_s = _elapsed(start, first)
    moved = 0

    def step(token):
        nonlocal moved
        moved += cache.get_seq_length() * kv_bytes_per_token_layer(model) * model.config.num_hidden_layers
        return model(token, past_key_values=cache, use_cache=True).logits

    tokens, seconds = decode_loop(step, first, new_tokens)
    return {
        "tokens": [int(first)] + tokens[:-1], "prefill_s": prefill_s, "decode_s": seconds,
        "tokens_per_s": new_tokens / seconds, "stall_share": None, "h2d_bytes_per_token": moved / new_tokens,
        "prefetch_recall": None, "mass_coverage": None, "device_read_bytes_per_token": moved / new_tokens,
        "host_read_bytes_per_token": 0.0,
    }


@torch.inference_mode()
def run_offload(model, prompt, new_tokens, budget, link_gbps, **config):
    om = OffloadedModel(model, device_budget=budget, emulate_link_gbps=link_gbps, **config)
    try:
        cache = om.new_cache(1, prompt.shape[1] + new_tokens)
        start = time.perf_counter()
        logits = om(prompt, past_key_values=cache).logits
        first = logits[:, -1:].argmax(-1)
        prefill_s = _elapsed(start, first)
        before = cache.stats()
        decode_start = cache.decode_s

        def step(token):
            return om(token, past_key_values=cache).logits

        tokens, seconds = decode_loop(step, first, new_tokens)
        after = cache.stats()
        stall = after.stall_s - before.stall_s
        needed = after.needed_pages - before.needed_pages
        on_device = after.needed_on_device - before.needed_on_device
        rows = after.mass_rows - before.mass_rows
        assert cache.decode_s > decode_start
        result = {
            "tokens": [int(first)] + tokens[:-1], "prefill_s": prefill_s, "decode_s": seconds,
            "tokens_per_s": new_tokens / seconds, "stall_share": stall / seconds,
            "h2d_bytes_per_token": (after.h2d_bytes - before.h2d_bytes) / new_tokens,
            "h2d_gbps": after.h2d_gbps, "d2h_gbps": after.d2h_gbps,
            "prefetch_recall": on_device / needed if needed else 1.0,
            "prefetch_precision": after.prefetch_precision,
            "mass_coverage": (after.mass_device - before.mass_device) / rows if rows else 1.0,
            "device_peak_bytes": after.device_peak_bytes, "device_budget_bytes": after.device_budget_bytes,
            "device_read_bytes_per_token": (after.device_read_bytes - before.device_read_bytes) / new_tokens,
            "host_read_bytes_per_token": (after.host_read_bytes - before.host_read_bytes) / new_tokens,
        }
        cache.release()
        return result
    finally:
        om.unwrap()


def _prompts(model, context: int, repeats: int, embedded_model: bool) -> list[torch.Tensor]:
    """`repeats` prompts of about `context` tokens: random ids, or the embedded model's pass-key
    samples up to their question (seeded: the same every run)."""
    if embedded_model:
        from offload.models import embedded

        samples = embedded.task_samples("passkey", context, repeats, seed=0)
        return [torch.from_numpy(s.input_ids[None, : s.context_end].copy()) for s in samples]
    generator = torch.Generator().manual_seed(context)
    return [torch.randint(3, model.config.vocab_size, (1, context), generator=generator) for _ in range(repeats)]


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _combine(runs: list[dict]) -> dict:
    """One row from runs on different prompts: the median tokens/s, the mean of every other number."""
    out = {}
    for key, value in runs[0].items():
        if key == "tokens":
            continue
        values = [r[key] for r in runs]
        if key == "tokens_per_s":
            out[key] = statistics.median(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = sum(values) / len(values)
        else:
            out[key] = value
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="offload bench decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="an 8k prompt, 32 new tokens")
    parser.add_argument("--contexts", type=int, nargs="*", help="prompt lengths (default 8192 32768)")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--link-gbps", type=float, default=25.0)
    parser.add_argument("--budget-fraction", type=float, default=None,
                        help="device budget as a share of the KV cache (default 0.10; 0.25 with --model embedded)")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--configs", default="a,b,c,d,e,f",
                        help="which of a,b,c,d,e,f to run (a always runs: the baseline)")
    parser.add_argument("--model", choices=["llama-layout", "embedded"], default="llama-layout",
                        help="random-weight Llama-3-8B layout (default) or the trained embedded model on pass-key prompts")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per configuration (each a different prompt); tokens/s is their median")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu (default): the CPU emulates the device and the link (--link-gbps); cuda: a real GPU "
                             "and its own PCIe link (no emulation), and (a) is transformers' DynamicCache(offloading=True)")
    parser.add_argument("--out", default=str(RESULTS / "decode"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    device = torch.device(args.device)
    link_gbps = args.link_gbps if device.type == "cpu" else 0.0
    wanted = set(args.configs.split(",")) | {"a"}
    unknown = wanted - set("abcdef")
    if unknown:
        parser.error(f"--configs takes a,b,c,d,e,f, got {','.join(sorted(unknown))!r}")
    embedded_model = args.model == "embedded"
    contexts = args.contexts or ([4096] if embedded_model else [8192] if args.quick else [8192, 32768])
    new_tokens = args.new_tokens or (32 if args.quick else 64 if embedded_model else 256)
    budget_fraction = args.budget_fraction if args.budget_fraction is not None else 0.25 if embedded_model else 0.10
    torch.set_num_threads(torch.get_num_threads())
    if embedded_model:
        from offload.models import embedded

        model = embedded.load_embedded_model()[0]
    else:
        model = build_model(args.layers, getattr(torch, args.dtype))
    model = model.to(device)
    layers = model.config.num_hidden_layers
    rows = []
    for context in contexts:
        prompts = [p.to(device) for p in _prompts(model, context, args.repeats, embedded_model)]
        total = context + new_tokens
        kv_total = total * kv_bytes_per_token_layer(model) * layers
        budget = int(budget_fraction * kv_total)
        common = dict(page_size=args.page_size)
        configs = {
            "(a) whole-layer offload": (lambda prompt: run_baseline(model, prompt, new_tokens, args.link_gbps))
            if device.type == "cpu" else (lambda prompt: run_baseline_cuda(model, prompt, new_tokens)),
            "(b) exact, no prefetch": lambda prompt: run_offload(model, prompt, new_tokens, budget, link_gbps,
                                                                 mode="exact", prefetch=False, **common),
            "(c) exact + prefetch": lambda prompt: run_offload(model, prompt, new_tokens, budget, link_gbps,
                                                               mode="exact", prefetch=True, **common),
            "(d) sparse + prefetch": lambda prompt: run_offload(model, prompt, new_tokens, budget, link_gbps,
                                                                mode="sparse", prefetch=True, **common),
            "(e) sparse, no prefetch": lambda prompt: run_offload(model, prompt, new_tokens, budget, link_gbps,
                                                                  mode="sparse", prefetch=False, **common),
            "(f) sparse, misses skipped": lambda prompt: run_offload(model, prompt, new_tokens, budget, link_gbps,
                                                                     mode="sparse", prefetch=False,
                                                                     sparse_misses="skip", **common),
        }
        configs = {name: run for name, run in configs.items() if name[1] in wanted}
        baseline, baseline_tokens = None, None
        for name, run in configs.items():
            print(f"context {context}: {name} ...", flush=True)
            runs = [run(prompt) for prompt in prompts]
            baseline_tokens = baseline_tokens or [r["tokens"] for r in runs]
            agree = sum(sum(a == b for a, b in zip(r["tokens"], base)) for r, base in zip(runs, baseline_tokens))
            result = _combine(runs)
            baseline = baseline or result
            shares = {"device": result["device_read_bytes_per_token"] / kv_total,
                      "host": result["host_read_bytes_per_token"] / kv_total,
                      "link": result["h2d_bytes_per_token"] / kv_total}
            result.update(
                shares=shares, projected_tokens_per_s={str(c): projection.project(shares, c) for c in PROJECTED},
                config=name, context=context, new_tokens=new_tokens, kv_total_bytes=kv_total, device_budget=budget,
                repeats=len(runs), tokens_per_s_runs=[r["tokens_per_s"] for r in runs],
                h2d_ratio_to_a=result["h2d_bytes_per_token"] / baseline["h2d_bytes_per_token"],
                speedup_vs_a=result["tokens_per_s"] / baseline["tokens_per_s"],
                token_agreement_with_a=agree / (new_tokens * len(runs)),
            )
            rows.append(result)
            print(f"   {result['tokens_per_s']:.2f} tok/s, stall {_share(result['stall_share'])}, "
                  f"h2d/token {result['h2d_bytes_per_token'] / 2**20:.2f} MiB ({result['h2d_ratio_to_a']:.3f} of a), "
                  f"recall {result['prefetch_recall']}, coverage {result['mass_coverage']}", flush=True)
    meta = {
        "command": command_line("decode", argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (emulated device tier)",
        "link_gbps": link_gbps, "budget_fraction": budget_fraction, "layers": layers,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "page_size": args.page_size,
        "load_avg": list(os.getloadavg()), "repeats": args.repeats, "model": args.model,
        "layout": ("the embedded model (8 query heads, 2 KV heads, head_dim 16, trained), pass-key prompts"
                   if embedded_model else "32 query heads, 8 KV heads, head_dim 128, hidden 512, random weights"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"Decode benchmark (`{meta['command']}`): {meta['layout']}, {layers} layers, {meta['dtype']}, "
        + (f"emulated {args.link_gbps:g} GB/s link" if link_gbps else f"on a {meta['device']} and its own PCIe "
           "link ((a): transformers' DynamicCache(offloading=True))")
        + f", device budget {100 * budget_fraction:.0f}% of the KV cache, "
        f"page size {args.page_size}; tokens/s the median of {args.repeats} run(s) on different prompts, "
        f"the rest their mean; load average {meta['load_avg'][0]:.1f} on {meta['cpu_threads']} threads.",
        "",
        "| context | configuration | prefill s | tokens/s | × (a) | stall share | h2d / token | ÷ (a) | recall | mass coverage | tokens = (a) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        recall = "—" if r["prefetch_recall"] is None else f"{r['prefetch_recall']:.3f}"
        coverage = "—" if r["mass_coverage"] is None else f"{r['mass_coverage']:.3f}"
        lines.append(
            f"| {r['context']} | {r['config']} | {r['prefill_s']:.2f} | {r['tokens_per_s']:.2f} | {r['speedup_vs_a']:.2f} | "
            f"{_share(r['stall_share'])} | {r['h2d_bytes_per_token'] / 2**20:.3f} MiB | {r['h2d_ratio_to_a']:.4f} | "
            f"{recall} | {coverage} | {100 * r['token_agreement_with_a']:.0f}% |"
        )
    def pairs(first: str, second: str):  # rows of two configurations at the same context
        return [(x, y) for x in rows for y in rows if x["context"] == y["context"]
                and x["config"].startswith(f"({first})") and y["config"].startswith(f"({second})")]

    for d, e in pairs("d", "e"):
        lines += ["", f"Prefetch in sparse mode at {d['context']}: (d) / (e) tokens/s "
                      f"{d['tokens_per_s'] / e['tokens_per_s']:.2f}x, recall {d['prefetch_recall']:.3f} against "
                      f"{e['prefetch_recall']:.3f}, h2d bytes per token "
                      + (f"{d['h2d_bytes_per_token'] / e['h2d_bytes_per_token']:.2f}x what the residency rule alone moves."
                         if e["h2d_bytes_per_token"] else f"{d['h2d_bytes_per_token'] / 2**10:.1f} KiB (none without prefetch).")]
    for e, f in pairs("e", "f"):
        lines += ["", f"The most prefetch can gain here at {e['context']}: (f) / (e) tokens/s "
                      f"{f['tokens_per_s'] / e['tokens_per_s']:.2f}x (no host part at all"
                      + ("; on this CPU a page read on the host costs what one on the device does, so only the host "
                         "part's fixed cost can be saved)." if device.type == "cpu" else ").")]
    lines += [
        "",
        f"Projection, not a measurement (`offload/benchmarks/projection.py`): the bytes each configuration read "
        f"on the device, read on the host and moved over the link per token, as shares of the KV cache at the "
        f"measured context, scaled to {projection.LLAMA3_8B.name} on {projection.H100_PCIE5.name} (device, host "
        "part and link overlap; weights read every step; bandwidth-bound).",
        "",
        "| measured at | configuration | device / KV | host / KV | link / KV | "
        + " | ".join(f"projected tokens/s at {c // 1024}k" for c in PROJECTED) + " |",
        "|---|---|---|---|---|" + "---|" * len(PROJECTED),
    ]
    for r in rows:
        s = r["shares"]
        lines.append(f"| {r['context']} | {r['config']} | {s['device']:.3f} | {s['host']:.3f} | {s['link']:.4f} | "
                     + " | ".join(f"{r['projected_tokens_per_s'][str(c)]:.1f}" for c in PROJECTED) + " |")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
