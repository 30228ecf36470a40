"""`offload bench prefix`: time to first token with and without prefix reuse, and a 200-request soak.

    offload bench prefix                 # 8k shared prefix, 5 runs per configuration, 200-request soak
    offload bench prefix --quick         # 2k prefix, 3 runs, 40 requests

Time to first token (TTFT) is `generate(prefix + question, max_new_tokens=1)`. For each model
(the embedded model; a random-weight model with Llama-3-8B's KV layout, i.e. 32 query heads, 8 KV
heads, head_dim 128, but a small hidden size and few layers so the CPU run stays short), one run
measures side by side, interleaved, with a fresh question each time:

  cold    offload with a prefix it has never seen: the whole prompt is prefilled
  reuse   offload, the prefix cached by an earlier request: only the question is prefilled
  plain   an unwrapped copy of the model with its DynamicCache (reference)

The soak sends 200 consecutive requests (one of four prefixes + a fresh question, 8 new tokens)
through one wrapper whose host budget holds about two prefixes, so cached prefixes are evicted all
along; it records RSS, host-pool pages in use and cached pages every 10 requests. A flat line is
the claim: nothing accumulates. Results: bench/results/prefix.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import psutil
import torch

from offload import OffloadedModel

RESULTS = Path("bench/results")
QUESTION_TOKENS = 64


def llama3_layout_model(num_layers: int = 2, dtype: torch.dtype = torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=num_layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=65536, rope_theta=500000.0)
    return LlamaForCausalLM(config).eval().to(dtype)


def embedded_model(context: int):
    from offload.models.embedded import load_embedded_model

    model, _ = load_embedded_model()
    # RoPE has no hard limit; the trained length only bounds quality, which TTFT does not measure.
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, context + 256)
    return model


def _ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _ttft(generate, prompt: torch.Tensor) -> float:
    start = time.perf_counter()
    generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def ttft(model, name: str, prefix_tokens: int, runs: int) -> dict:
    vocab = model.config.vocab_size
    shared = _ids(vocab, prefix_tokens, seed=1)
    plain = copy.deepcopy(model)  # the unwrapped reference, side by side with the wrapped one
    context = prefix_tokens + QUESTION_TOKENS + 1
    om = OffloadedModel(model, host_budget="8GiB")
    om.config.device_budget = 4 * om.minimum_device_budget(1, context)  # the KV cache far over budget
    times: dict[str, list[float]] = {"plain": [], "cold": [], "reuse": []}
    hits = []
    try:
        with torch.inference_mode():
            _ttft(plain.generate, torch.cat([shared, _ids(vocab, QUESTION_TOKENS, 98)], 1))  # warm-up
            _ttft(om.generate, torch.cat([shared, _ids(vocab, QUESTION_TOKENS, 99)], 1))  # caches the prefix
            for run in range(runs):
                question = _ids(vocab, QUESTION_TOKENS, 100 + run)
                # cold: a prefix never seen, so nothing can be reused
                times["cold"].append(_ttft(om.generate, torch.cat([_ids(vocab, prefix_tokens, 200 + run), question], 1)))
                assert om.stats.prefix_hit_tokens == 0
                times["reuse"].append(_ttft(om.generate, torch.cat([shared, question], 1)))
                hits.append(om.stats.prefix_hit_tokens)
                times["plain"].append(_ttft(plain.generate, torch.cat([shared, question], 1)))
    finally:
        om.unwrap()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name, "prefix_tokens": prefix_tokens, "question_tokens": QUESTION_TOKENS, "runs": runs,
        "ttft_s": times, "median_s": med, "speedup_reuse_vs_cold": med["cold"] / med["reuse"],
        "speedup_reuse_vs_plain": med["plain"] / med["reuse"], "prefix_hit_tokens": hits,
    }


def soak(model, name: str, prefix_tokens: int, requests: int) -> dict:
    """Consecutive requests over four prefixes with a host budget of about two: RSS and pools stay flat."""
    vocab = model.config.vocab_size
    prefixes = [_ids(vocab, prefix_tokens, seed=10 + i) for i in range(4)]
    process = psutil.Process(os.getpid())
    om = OffloadedModel(model, prefix_cache=True)
    context = prefix_tokens + QUESTION_TOKENS + 8
    layout_bytes = om.minimum_device_budget(1, context)
    om.config.device_budget = 4 * layout_bytes
    cfg = model.config
    page_bytes = 2 * cfg.num_key_value_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) \
        * om.config.page_size * next(model.parameters()).element_size() * cfg.num_hidden_layers
    om.config.host_budget = int(2.5 * (context // om.config.page_size) * page_bytes)
    samples = []
    try:
        with torch.inference_mode():
            for i in range(requests):
                prompt = torch.cat([prefixes[i % 4 if i % 8 < 4 else (i // 8) % 4],
                                    _ids(vocab, QUESTION_TOKENS, 1000 + i)], 1)
                om.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                            pad_token_id=0)
                if i % 10 == 9 or i == 0:
                    gc.collect()
                    pools = om.store.homes
                    samples.append({
                        "request": i + 1,
                        "rss_bytes": process.memory_info().rss,
                        "host_pages_in_use": pools[0].host.num_used,
                        "host_pages_budget": pools[0].host.max_capacity,
                        "cached_pages": om.store.prefix_cached_pages(),
                        "prefix_hit_tokens": om.stats.prefix_hit_tokens,
                        "live_requests": len(om.store.requests),
                    })
    finally:
        om.unwrap()
    rss = [s["rss_bytes"] for s in samples[1:]]
    return {"model": name, "prefix_tokens": prefix_tokens, "requests": requests, "samples": samples,
            "rss_growth_bytes_after_first_10": max(rss) - min(rss) if rss else 0,
            "max_host_pages_in_use": max(s["host_pages_in_use"] for s in samples),
            "host_pages_budget": samples[0]["host_pages_budget"]}


def markdown(result: dict) -> str:
    mib = 1 << 20
    lines = [
        f"# Prefix reuse: time to first token ({result['machine']})", "",
        f"Command: `{result['command']}`. Load before the run: {result['load_before']}. Medians of interleaved runs, "
        f"seconds; a fresh {QUESTION_TOKENS}-token question after the shared prefix each run.", "",
        "| model | prefix tokens | plain (DynamicCache) | offload, new prefix | offload, prefix reused | reuse vs new | reuse vs plain | tokens reused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["ttft"]:
        m = r["median_s"]
        lines.append(f"| {r['model']} | {r['prefix_tokens']} | {m['plain']:.3f} | {m['cold']:.3f} | {m['reuse']:.3f} | "
                     f"{r['speedup_reuse_vs_cold']:.1f}x | {r['speedup_reuse_vs_plain']:.1f}x | {r['prefix_hit_tokens'][0]} |")
    s = result["soak"]
    lines += [
        "", f"## {s['requests']} consecutive requests ({s['model']}, four {s['prefix_tokens']}-token prefixes, host budget "
        f"of about two)", "",
        "| after request | RSS (MiB) | host pages in use (layer 0) | budget | cached pages | live requests |",
        "|---|---|---|---|---|---|",
    ]
    for x in s["samples"]:
        lines.append(f"| {x['request']} | {x['rss_bytes'] / mib:.1f} | {x['host_pages_in_use']} | {x['host_pages_budget']} | "
                     f"{x['cached_pages']} | {x['live_requests']} |")
    lines += ["", f"RSS range after the first 10 requests: {s['rss_growth_bytes_after_first_10'] / mib:.1f} MiB; "
              f"host pages never above {s['max_host_pages_in_use']} of {s['host_pages_budget']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="offload bench prefix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2k prefix, 3 runs, 40 soak requests")
    parser.add_argument("--prefix-tokens", type=int, default=None, help="shared prefix length (default 8192)")
    parser.add_argument("--runs", type=int, default=None, help="TTFT runs per configuration (default 5)")
    parser.add_argument("--requests", type=int, default=None, help="soak requests (default 200)")
    parser.add_argument("--out", default=str(RESULTS / "prefix"), help="output path without suffix")
    args = parser.parse_args(argv)
    prefix_tokens = args.prefix_tokens or (2048 if args.quick else 8192)
    runs = args.runs or (3 if args.quick else 5)
    requests = args.requests or (40 if args.quick else 200)
    for name, value in (("--prefix-tokens", prefix_tokens), ("--runs", runs), ("--requests", requests)):
        if value < 1:
            parser.error(f"{name} must be >= 1; got {value}")
    load = os.getloadavg()
    result = {
        "command": "offload bench prefix " + " ".join(argv or []),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_before": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "ttft": [
            ttft(embedded_model(prefix_tokens + QUESTION_TOKENS), "embedded", prefix_tokens, runs),
            ttft(llama3_layout_model(), "Llama-3-8B KV layout, 2 layers, bf16, random", prefix_tokens, runs),
        ],
        "soak": soak(embedded_model(2048 + QUESTION_TOKENS), "embedded", min(prefix_tokens, 2048), requests),
    }
    load = os.getloadavg()
    result["load_after"] = f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
