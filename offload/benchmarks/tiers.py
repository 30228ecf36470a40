"""Tiers below the host: a long context whose KV is several times the host budget, decoded from
disk and from Ray lenders, against the two-tier store that holds it all on the host.

    offload bench tiers                         # a 32k prompt, 16 new tokens, exact and sparse
    offload bench tiers --quick                 # an 8k prompt, 4 new tokens
    offload bench tiers --modes exact --configs a,c,d --disk-dir /mnt/scratch

The Llama-like layout of `offload bench decode` (32 query heads, 8 KV heads, head_dim 128, a small
hidden size, few layers, random weights), one prompt, decoded greedily with
`OffloadedModel.generate`, a fresh wrapper per configuration. The device budget is 10% of the KV
cache at the final length. Configurations, in each mode (exact: (a)-(d); sparse, default token
budget: (e)-(h), the same four):

  (a) two-tier: the host budget holds the whole KV (the reference; skipped if it would not fit RAM)
  (b) disk: host budget = KV / 4, a disk tier in a fresh temporary directory (no prefix files
      from an earlier run to reuse)
  (c) Ray, pull: host budget = KV / 4, 2 lenders lending the whole KV each, remote pages pulled back
  (d) Ray, remote attention: the same, attending remote pages on the lenders (partials come back)

One local Ray session serves the run. Reported per configuration: decode tokens/s, prefill
seconds, the host tier's peak (tracked at every `PageHome.add` and `promote`) and final bytes
against its budget, bytes per decode token copied host->device, read into the device part
(per-head gathers), read from disk, pulled over the wire and sent for remote attention, page
movements, and whether the tokens equal the two-tier run's in the same mode. Byte and page counts
per token are decode-only: the request's counters read by a logits processor when prefill ends
(its first call), subtracted from those it read after the last decode step. The key ratio: wire
bytes per decode token, (c) over (d). Results: bench/results/tiers.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from offload import OffloadedModel
from offload.benchmarks.decode import build_model, kv_bytes_per_token_layer
from offload.sizes import format_bytes
from offload.store.home import PageHome

RESULTS = Path("bench/results")  # relative to where it runs: the package may be installed anywhere
CONFIGS = {"a": "two-tier", "b": "disk", "c": "Ray, pull", "d": "Ray, remote attention"}
MODES = ("exact", "sparse")
LENDERS = 2
# Counters whose decode-only part is reported (OffloadStats fields).
DECODE_COUNTERS = ("h2d_bytes", "gathered_bytes", "disk_read_bytes", "disk_write_bytes", "wire_pull_bytes",
                   "wire_attend_bytes", "remote_attend_s", "spilled_pages", "promoted_pages", "recomputed_pages",
                   "recoveries")
PER_TOKEN = ("h2d_bytes", "gathered_bytes", "disk_read_bytes", "wire_pull_bytes", "wire_attend_bytes")


class HostPeak:
    """The most host-tier bytes in use (and allocated) at once, over every layer's `PageHome`:
    read after each `add` (new pages, spilling to make room) and `promote` (pages coming back up),
    the two calls that take host slots. `with peak:` patches them and always restores them."""

    def __init__(self) -> None:
        self.homes: list[PageHome] = []
        self.used_bytes = 0
        self.reserved_bytes = 0
        self._originals: dict[str, object] = {}

    def reset(self) -> None:
        self.homes, self.used_bytes, self.reserved_bytes = [], 0, 0

    def _note(self, home: PageHome) -> None:
        if not any(h is home for h in self.homes):
            self.homes.append(home)
        self.used_bytes = max(self.used_bytes, sum(h.host.used_bytes for h in self.homes))
        self.reserved_bytes = max(self.reserved_bytes, sum(h.host.reserved_bytes for h in self.homes))

    def __enter__(self) -> "HostPeak":
        for name in ("add", "promote"):
            original = getattr(PageHome, name)
            self._originals[name] = original

            def wrapped(home, *args, _original=original, **kwargs):
                try:
                    return _original(home, *args, **kwargs)
                finally:
                    self._note(home)

            setattr(PageHome, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(PageHome, name, original)
        self._originals.clear()


class StepCounters(LogitsProcessor):
    """Reads the request's counters each time a forward has produced logits: the first read is
    the end of prefill, the latest the end of the last decode step. (Not `om.stats` after
    `generate`: with a disk tier, `generate` then saves the prompt's pages as prefix files, reading
    every page, and that is not decode traffic.)"""

    def __init__(self, om: OffloadedModel) -> None:
        self.om = om
        self.prefill = None  # OffloadStats at the end of prefill
        self.last = None  # ... at the end of the last decode step
        self.calls = 0  # forwards that produced logits: prefill, then each decode step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.last = self.om.stats
        if self.calls == 0:
            self.prefill = self.last
        self.calls += 1
        return scores


def tier_options(config: str, kv_bytes: int, disk_dir: str | None) -> dict:
    """OffloadConfig fields of one configuration (a-d) for a KV cache of `kv_bytes`."""
    if config == "a":
        return dict(host_budget=kv_bytes + kv_bytes // 16)  # room to spare: nothing ever spills
    options = dict(host_budget=kv_bytes // 4)
    if config == "b":
        options["disk_dir"] = disk_dir
    else:
        options.update(remote_lenders=LENDERS, remote_budget=kv_bytes,
                       remote_attention="pull" if config == "c" else "remote")
    return options


@torch.inference_mode()
def run_config(model, prompt: torch.Tensor, new_tokens: int, peak: HostPeak, **options) -> dict:
    """One `generate` through a fresh OffloadedModel; its tokens, timings and counters."""
    om = OffloadedModel(model, **options)
    try:
        peak.reset()  # (the wrapper's construction probe used a store of its own)
        counters = StepCounters(om)
        start = time.perf_counter()
        out = om.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False,
                          logits_processor=LogitsProcessorList([counters]))
        wall_s = time.perf_counter() - start
        stats = om.stats
    finally:
        om.unwrap()  # closes the store: the disk tier's files and the lenders go with it
    steps = counters.calls - 1  # forwards after prefill; prefill chose the first token
    before, after = counters.prefill, counters.last
    result = {
        "tokens": out[0, prompt.shape[1]:].tolist(), "wall_s": wall_s, "decode_steps": steps,
        "decode_s": stats.decode_s, "prefill_s": stats.prefill_s,
        "tokens_per_s": steps / stats.decode_s if stats.decode_s > 0 else 0.0,
        "host_budget_bytes": om.config.host_budget, "host_end_bytes": stats.host_bytes,
        "host_peak_bytes": peak.used_bytes, "host_peak_reserved_bytes": peak.reserved_bytes,
        "lower_bytes": stats.lower_bytes, "device_peak_bytes": stats.device_peak_bytes,
        "device_budget_bytes": stats.device_budget_bytes,
        # what generate read from disk after the last step (saving the prompt's pages as prefix files)
        "after_decode_disk_read_bytes": stats.disk_read_bytes - after.disk_read_bytes,
    }
    for name in DECODE_COUNTERS:
        result[name] = getattr(after, name)  # the whole request: prefill and decode
        result[f"decode_{name}"] = getattr(after, name) - getattr(before, name)
    for name in PER_TOKEN:
        result[f"{name}_per_token"] = result[f"decode_{name}"] / steps if steps else 0.0
    result["wire_bytes_per_token"] = result["wire_pull_bytes_per_token"] + result["wire_attend_bytes_per_token"]
    return result


def median_run(runs: list[dict]) -> dict:
    """Medians of the numeric fields over repeats; the tokens of the first (and whether all agree)."""
    merged = dict(runs[0])
    for name, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[name] = statistics.median(r[name] for r in runs)
    merged["repeats"] = len(runs)
    merged["tokens_stable"] = all(r["tokens"] == runs[0]["tokens"] for r in runs)
    return merged


@contextlib.contextmanager
def ray_session(needed: bool):
    """One local Ray session for the whole run (lenders of every configuration live in it)."""
    if not needed:
        yield
        return
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.3f} MiB" if num_bytes else "0"


def _times(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="offload bench tiers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="an 8k prompt, 4 new tokens")
    parser.add_argument("--context", type=int, default=None, help="prompt tokens (default 32768; --quick 8192)")
    parser.add_argument("--new-tokens", type=int, default=None, help="greedy tokens (default 16; --quick 4)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--budget-fraction", type=float, default=0.10, help="device budget, share of the KV")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--modes", type=_words, default=list(MODES), help="exact and/or sparse")
    parser.add_argument("--configs", type=_words, default=list(CONFIGS), help="which of a,b,c,d to run")
    parser.add_argument("--disk-dir", default=None,
                        help="where the disk tier's page files go (a fresh subdirectory per run; default: the "
                             "system's temporary directory)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (medians reported)")
    parser.add_argument("--out", default=str(RESULTS / "tiers"))
    args = parser.parse_args(argv)
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"--modes takes exact and/or sparse, got {mode!r}")
    for config in args.configs:
        if config not in CONFIGS:
            parser.error(f"--configs takes {','.join(CONFIGS)}, got {config!r}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    context = args.context or (8192 if args.quick else 32768)
    new_tokens = args.new_tokens or (4 if args.quick else 16)
    if new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2 (the first token comes from prefill), got {new_tokens}")
    command = " ".join(["offload bench tiers", *(argv if argv is not None else sys.argv[1:])])
    load_start = os.getloadavg()
    run_start = time.perf_counter()

    model = build_model(args.layers, getattr(torch, args.dtype))
    torch.manual_seed(context)
    prompt = torch.randint(3, model.config.vocab_size, (1, context))
    kv_total = (context + new_tokens) * kv_bytes_per_token_layer(model) * args.layers
    device_budget = int(args.budget_fraction * kv_total)
    common = dict(device_budget=device_budget, page_size=args.page_size)
    configs = [c for c in CONFIGS if c in args.configs]
    notes = []
    available = psutil.virtual_memory().available
    if "a" in configs and kv_total + kv_total // 16 > available // 2:
        configs.remove("a")
        notes.append(f"(a) skipped: the whole KV ({format_bytes(kv_total)}) would not fit half of this machine's "
                     f"available memory ({format_bytes(available)})")
        print(notes[-1], flush=True)

    # Warm-up (allocator, kernels, transformers' generate path): a short two-tier run, not reported.
    with HostPeak() as peak:
        run_config(model, prompt[:, :512], 2, peak, mode="exact", page_size=args.page_size, host_budget=kv_total,
                   device_budget=max(device_budget, 64 * 2**20))

    rows, references = [], {}
    with ray_session(any(c in ("c", "d") for c in configs)), HostPeak() as peak:
        for mode in [m for m in MODES if m in args.modes]:
            for config in configs:
                letter = config if mode == "exact" else "efgh"["abcd".index(config)]
                name = f"({letter}) {CONFIGS[config]}, {mode}"
                print(f"context {context}: {name} ...", flush=True)
                load_avg = os.getloadavg()[0]  # timings below are only as good as the machine was quiet
                runs = []
                for _ in range(args.repeats):
                    with tempfile.TemporaryDirectory(prefix="offload-tiers-", dir=args.disk_dir) as scratch:
                        options = tier_options(config, kv_total, scratch)
                        runs.append(run_config(model, prompt, new_tokens, peak, mode=mode, **common, **options))
                result = median_run(runs)
                if config == "a":
                    references[mode] = result["tokens"]
                reference = references.get(mode)
                result.update(
                    config=name, letter=letter, tier_config=config, mode=mode, load_avg=load_avg,
                    tokens_equal_a=None if reference is None else result["tokens"] == reference,
                    host_within_budget=max(result["host_peak_bytes"], result["host_end_bytes"])
                    <= result["host_budget_bytes"],
                )
                rows.append(result)
                print(f"   {result['tokens_per_s']:.3f} tok/s decode, prefill {result['prefill_s']:.1f} s, host peak "
                      f"{format_bytes(result['host_peak_bytes'])} of {format_bytes(result['host_budget_bytes'])}, "
                      f"wire/token {_mib(result['wire_bytes_per_token'])}, disk/token "
                      f"{_mib(result['disk_read_bytes_per_token'])}, tokens = reference: {result['tokens_equal_a']}",
                      flush=True)

    ratios = {}
    for mode in MODES:
        by = {r["tier_config"]: r for r in rows if r["mode"] == mode}
        if "c" in by and "d" in by and by["d"]["wire_bytes_per_token"] > 0:
            ratios[mode] = {
                "pull": by["c"]["config"], "remote": by["d"]["config"],
                "pull_wire_bytes_per_token": by["c"]["wire_bytes_per_token"],
                "remote_wire_bytes_per_token": by["d"]["wire_bytes_per_token"],
                "ratio": by["c"]["wire_bytes_per_token"] / by["d"]["wire_bytes_per_token"],
                "attention_only_ratio": by["c"]["wire_pull_bytes_per_token"] / by["d"]["wire_attend_bytes_per_token"]
                if by["d"]["wire_attend_bytes_per_token"] else None,
            }
    wall_s = time.perf_counter() - run_start
    meta = {
        "command": command, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
        "memory_bytes": psutil.virtual_memory().total, "load_avg_start": list(load_start),
        "load_avg_end": list(os.getloadavg()), "wall_s": wall_s, "context": context, "new_tokens": new_tokens,
        "layers": args.layers, "dtype": args.dtype, "page_size": args.page_size, "kv_total_bytes": kv_total,
        "device_budget_bytes": device_budget, "lenders": LENDERS, "repeats": args.repeats, "notes": notes,
        "layout": "32 query heads, 8 KV heads, head_dim 128, hidden 512, random weights",
    }
    for row in rows:
        row.pop("tokens")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "ratios": ratios, "rows": rows}, indent=2))
    lines = [
        f"Tiers benchmark (`{command}`): {meta['layout']}, {args.layers} layers, {args.dtype}, page size "
        f"{args.page_size}; a {context}-token prompt, {new_tokens} greedy tokens, KV {format_bytes(kv_total)}; device "
        f"budget {100 * args.budget_fraction:.0f}% of the KV; host budget the whole KV in (a)/(e), a quarter of it "
        f"otherwise; {LENDERS} Ray lenders of the whole KV each in one local Ray session. Machine: {meta['machine']}, "
        f"{meta['cpu_count']} cores ({meta['cpu_threads']} torch threads), {format_bytes(meta['memory_bytes'])} RAM; "
        f"load average {load_start[0]:.1f} at the start and {meta['load_avg_end'][0]:.1f} at the end (a machine "
        f"shared with other work: timings are noisy); {args.repeats} run(s) per configuration (medians); "
        f"wall time {wall_s / 60:.1f} min.",
        "",
        "Decode tokens/s counts the forwards after prefill (prefill picks the first token): decode steps / decode "
        "seconds. Bytes per token and page counts in parentheses are decode-only: the request's counters read by a "
        "logits processor when prefill ends (its first call) subtracted from those it read after the last decode "
        "step, divided by decode steps. Spilled and promoted pages outside parentheses are the whole request's "
        "(prefill and decode). Neither includes what `generate` does after the last step: with a disk tier it saves "
        "the prompt's pages as prefix files, reading every page once (JSON: `after_decode_disk_read_bytes`). "
        "Host peak: the most host-tier bytes in use at once, read after every `PageHome.add` and `promote`. Tokens "
        "are compared with the two-tier run of the same mode: (a) for exact, (e) for sparse. Load avg: the 1-minute "
        "load average when the configuration started.",
        *[f"{note}." for note in notes],
        "",
        "| configuration | decode tokens/s | prefill s | host peak / budget | host at end | h2d / token | "
        "gathered / token | disk read / token | wire pull / token | wire attend / token | spilled (decode) | "
        "promoted (decode) | recomputed | remote attend s (decode) | tokens = (a) / (e) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        equal = "—" if r["tokens_equal_a"] is None else ("yes" if r["tokens_equal_a"] else "**no**")
        lines.append(
            f"| {r['config']} | {r['tokens_per_s']:.3f} | {r['prefill_s']:.1f} | "
            f"{format_bytes(r['host_peak_bytes'])} / {format_bytes(r['host_budget_bytes'])} | "
            f"{format_bytes(r['host_end_bytes'])} | {_mib(r['h2d_bytes_per_token'])} | "
            f"{_mib(r['gathered_bytes_per_token'])} | {_mib(r['disk_read_bytes_per_token'])} | "
            f"{_mib(r['wire_pull_bytes_per_token'])} | {_mib(r['wire_attend_bytes_per_token'])} | "
            f"{r['spilled_pages']} ({r['decode_spilled_pages']}) | "
            f"{r['promoted_pages']} ({r['decode_promoted_pages']}) | {r['recomputed_pages']} | "
            f"{r['remote_attend_s']:.2f} ({r['decode_remote_attend_s']:.2f}) | {equal} | {r['load_avg']:.1f} |"
        )
    over = [r["config"] for r in rows if not r["host_within_budget"]]
    lines += ["", f"Host tier over its budget (peak or end): {', '.join(over)}." if over else
              "The host tier stayed within its budget in every configuration (peak and end)."]
    for mode, ratio in ratios.items():
        pull, remote = ratio["pull"].split()[0], ratio["remote"].split()[0]
        attention = (f"; {pull}'s pulls over {remote}'s remote-attention traffic alone: "
                     f"{_times(ratio['attention_only_ratio'])}" if ratio["attention_only_ratio"] else "")
        lines.append(
            f"Wire bytes per decode token at {context} tokens, {mode}: pull {pull} "
            f"{_mib(ratio['pull_wire_bytes_per_token'])}, remote attention {remote} "
            f"{_mib(ratio['remote_wire_bytes_per_token'])}: **{_times(ratio['ratio'])}** less over the wire with "
            f"remote attention (every wire byte: remote-attention traffic and pages pulled for any reason: attention, "
            f"promotions, device copies, per-head gathers){attention}.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
